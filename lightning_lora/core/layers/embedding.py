"""LoRA for ``nn.Embedding``, with PEFT's factors: ``A`` (r, num_embeddings), ``B`` (dim, r)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.layers.base import LoRAAdapter, LoRALayer


class LoRAEmbedding(LoRALayer):
    """``nn.Embedding``. ``A`` starts at zero and ``B`` random (the reverse of a Linear), as in PEFT.

    The low-rank branch looks rows up in ``A^T`` with the base's ``padding_idx`` (so the padding
    row's update gets no gradient), with dense gradients (``A`` is small). An embedding with
    ``max_norm`` renormalises its weight on every lookup, which has no merged equivalent: refused.
    """

    supports_dora = False
    plain_types = (nn.Embedding,)
    adapter_names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
    copied_attributes = (
        "num_embeddings",
        "embedding_dim",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    )

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def __init__(self, base: nn.Embedding, *args, **kwargs) -> None:
        if base.max_norm is not None:
            raise ValueError(
                f"an nn.Embedding with max_norm={base.max_norm} renormalises its rows on every lookup, so its "
                "adapter could not be merged; exclude it from the targets"
            )
        super().__init__(base, *args, **kwargs)

    def probe_input(self) -> torch.Tensor:
        return torch.arange(min(self.num_embeddings, 16), device=self.base_weight().device)

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.num_embeddings), (self.embedding_dim, rank)

    def init_factors(self, adapter: LoRAAdapter) -> None:
        nn.init.zeros_(adapter.lora_A)
        nn.init.normal_(adapter.lora_B)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.embedding(
            x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def update(self, x: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        rows = F.embedding(x, adapter.lora_A.t(), self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)
        return (rows @ adapter.lora_B.t()) * adapter.scale

    def adapter_output(self, x: torch.Tensor, out: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        return self.update(x, adapter)  # no dropout on the lookups, as in PEFT

    def lora_weight(self, adapter: LoRAAdapter) -> torch.Tensor:
        return (adapter.lora_B.float() @ adapter.lora_A.float()).t()

    def output_shape(self) -> tuple[int, ...]:
        return (self.embedding_dim,)
