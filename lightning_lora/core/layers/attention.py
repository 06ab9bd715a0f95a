"""LoRA for ``nn.MultiheadAttention``: its packed in-projection and its ``out_proj``.

``nn.MultiheadAttention`` never calls ``out_proj`` and keeps the query/key/value projection as a
bare ``in_proj_weight``: both are read directly by ``F.multi_head_attention_forward``. So this
layer adapts both itself. Each forward runs the original module through
``torch.func.functional_call`` with the weights it should see right now (base, merged, or
``W + scale * B A``, differentiable), which keeps every detail of the original forward (fast
path, masks, ``batch_first``) and adds each update exactly once. (PEFT merges and unmerges around
every forward, and adds the ``out_proj`` update twice when merged.)

The in-projection's factors are ``A`` (r, embed_dim), ``B`` (3 * embed_dim, r); ``out_proj`` is a
:class:`~lightning_lora.core.layers.linear.LoRALinear` with the same settings. PEFT's files hold the
latter under ``<name>.base_layer.out_proj``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lightning_lora.core.config import LoRAConfig
from lightning_lora.core.layers.base import DEFAULT_ADAPTER, LoRAAdapter, LoRALayer
from lightning_lora.core.layers.linear import LoRALinear


class LoRAMultiheadAttention(LoRALayer):
    """``nn.MultiheadAttention`` with query, key and value of the same size (as PEFT requires)."""

    linear_like = True
    supports_dora = False
    weight_name = "in_proj_weight"
    plain_types = (nn.MultiheadAttention,)
    copied_attributes = (
        "embed_dim",
        "kdim",
        "vdim",
        "num_heads",
        "dropout",
        "batch_first",
        "head_dim",
        "add_zero_attn",
    )

    # Not a private attribute we read or write of torch's, but the name torch reads of us: an
    # nn.TransformerEncoderLayer in eval without grad takes a fused kernel over its self_attn's
    # in_proj_weight / out_proj.weight (the base weights, the adapter left out) unless this is False.
    # tests/test_public_doors.py allows this one name here.
    _qkv_same_embed_dim = False

    optional_parameters = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                           "bias_k", "bias_v")  # fmt: skip

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def __init__(self, base: nn.MultiheadAttention, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        if not base.kdim == base.vdim == base.embed_dim:
            raise ValueError(
                "LoRA adapts nn.MultiheadAttention only when query, key and value have the same size "
                f"(kdim={base.kdim}, vdim={base.vdim}, embed_dim={base.embed_dim}); exclude this module"
            )
        # torch takes its fused kernel in eval with grad enabled only when no weight requires grad; the
        # kernels round differently. Injection freezes the base, so keep the choice the module had.
        self.base_was_trainable = any(p.requires_grad for p in base.parameters())
        super().__init__(base, config, adapter_name)
        self.out_proj = LoRALinear(base.out_proj, config, adapter_name)

    def companion_layers(self) -> list[LoRALayer]:
        return [self.out_proj]

    def per_sample_forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            "adapter_per_sample does not serve nn.MultiheadAttention layers (their batch is split across "
            "queries, keys, values and masks): run one adapter per batch there (set_active_adapters)"
        )

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.embed_dim), (3 * self.embed_dim, rank)

    def _check_base_forward(self, base: nn.Module) -> None:
        """Nothing to check: every forward runs the original module's own ``forward``."""

    def lora_weight(self, adapter: LoRAAdapter) -> torch.Tensor:
        return adapter.lora_B.float() @ adapter.lora_A.float()

    def output_shape(self) -> tuple[int, ...]:
        return (3 * self.embed_dim,)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.enabled and self.sample_adapters is not None:
            return self.per_sample_forward(*args, **kwargs)
        tensors = {name: self.effective_bias(name) for name in self.bias_names()}
        tensors[self.weight_name] = self.effective_weight()
        tensors["out_proj.weight"] = self.out_proj.effective_weight()
        if self.out_proj.bias is not None:
            tensors["out_proj.bias"] = self.out_proj.effective_bias()
        if self.base_was_trainable and torch.is_grad_enabled() and not any(t.requires_grad for t in tensors.values()):
            tensors[self.weight_name] = tensors[self.weight_name].detach().requires_grad_()  # the base's kernel
        self.base_layer.training = self.training  # the original is not registered, so eval() does not reach it
        return functional_call(self.base_layer, tensors, args, kwargs)

    def to_base(self) -> nn.Module:
        base = super().to_base()
        base.out_proj = self.out_proj.to_base()
        return base
