"""LoRA for ``nn.Linear`` and for transformers-style ``Conv1D`` (a linear layer stored transposed)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.layers.base import LoRAAdapter, LoRALayer
from lightning_lora.core.layers.fast_path import add_low_rank_update, low_rank_update


class LoRALinear(LoRALayer):
    """``nn.Linear`` (and subclasses such as attention's ``out_proj``): ``A`` (r, in), ``B`` (out, r)."""

    linear_like = True
    copied_attributes = ("in_features", "out_features")
    plain_types = (nn.Linear,)

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def probe_input(self) -> torch.Tensor:
        weight = self.base_weight()
        values = torch.linspace(-1, 1, 2 * self.in_features, device=weight.device, dtype=weight.dtype)
        return values.reshape(2, self.in_features)

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def update(self, x: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        return low_rank_update(x.to(adapter.lora_A.dtype), adapter.lora_A, adapter.lora_B, adapter.scale)

    def lora_weight(self, adapter: LoRAAdapter) -> torch.Tensor:
        return adapter.lora_B.float() @ adapter.lora_A.float()

    def is_batched(self, x: torch.Tensor) -> bool:
        return x.dim() >= 2  # a 1-D input is one unbatched sample

    def init_from_weight(self, adapter: LoRAAdapter) -> None:
        """PEFT's PiSSA (the top-``r`` singular triplets, split as ``sqrt(S / scale)`` between the factors) or
        OLoRA (``B`` the first ``r`` columns of ``Q``, ``A`` the first ``r`` rows of ``R`` of ``W = QR``); the
        layer keeps ``W - scale * B A``. Computed in fp32 from the original weight, whatever the layer runs now."""
        original = self.original_weight()
        if original.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"init={adapter.config.init!r} needs a float32, float16 or bfloat16 weight, got {original.dtype}"
            )
        weight = original.float()
        if self.output_dim_in_weight == 1:
            weight = weight.t()  # (out, in), as B A is laid out
        rank = adapter.rank
        if rank > min(weight.shape):
            raise ValueError(
                f"init={adapter.config.init!r} takes {rank} directions from a {tuple(weight.shape)} weight, which has "
                f"{min(weight.shape)}; use a rank of at most {min(weight.shape)} there (rank_pattern) or init='kaiming'"
            )
        if adapter.config.init == "pissa":
            left, values, right = torch.linalg.svd(weight, full_matrices=False)
            root = torch.sqrt(values[:rank] / adapter.scale)
            lora_A, lora_B = root[:, None] * right[:rank], left[:, :rank] * root
        else:
            q, r = torch.linalg.qr(weight)
            lora_A, lora_B = r[:rank], q[:, :rank]
        adapter.lora_A.copy_(lora_A)
        adapter.lora_B.copy_(lora_B)
        adapter.register_buffer("lora_A_init", lora_A.clone(), persistent=False)
        adapter.register_buffer("lora_B_init", lora_B.clone(), persistent=False)
        residual = weight - adapter.scale * lora_B @ lora_A  # PEFT's order of operations: (scale * B) @ A
        self.take_residual(residual.t() if self.output_dim_in_weight == 1 else residual)

    def output_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def per_sample_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample with its own adapter, without gathering rows: every adapter's rank-``r`` hidden state
        is taken for the whole batch and zeroed outside its samples (a ``(batch, r)`` mask, cheap at low
        rank), then accumulated into the base output by one ``addmm`` per adapter."""
        routing = self.sample_adapters
        dora = any(a.use_dora for a in self.lora_adapters.values())
        if dora or not self.is_batched(x) or x.shape[0] != len(routing):
            return super().per_sample_forward(x)  # DoRA, or the generic path's error for a wrong batch
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        out = F.linear(flat, self.weight, self.bias)
        for name, mask in routing.masks(x.device).items():
            if name not in self.lora_adapters:
                continue
            adapter = self.lora_adapters[name]
            per_row = mask.view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1]).reshape(-1, 1)
            dropped = adapter.lora_dropout(flat).to(adapter.lora_A.dtype)
            hidden = F.linear(dropped, adapter.lora_A)
            hidden = hidden * (per_row.to(hidden.dtype) * adapter.scale)
            if out.dtype == hidden.dtype:
                out = torch.addmm(out, hidden, adapter.lora_B.t())
            else:  # a half-precision base: the update in the adapter's dtype, as the one-adapter path computes it
                out = out + F.linear(hidden, adapter.lora_B).to(out.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_use = self.adapters_in_use() if self.enabled and self.sample_adapters is None else []
        if in_use and not any(a.use_dora for _, a in in_use):
            # The base output (of a 2-D view) is a fresh tensor the updates can be accumulated into.
            flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # no view ops for 2-D: per-op host time
            out = F.linear(flat, self.weight, self.bias)
            for _, a in in_use:
                out = add_low_rank_update(out, a.lora_dropout(flat), a.lora_A, a.lora_B, a.scale)
            return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


def is_conv1d_like(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_fc``), recognised by its structure.

    Integer ``nf``/``nx``, a weight stored (in, out) = (nx, nf) and a bias of nf: a linear layer
    computing ``x @ weight + bias``. Checked again against the module's own output at injection.
    """
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        not isinstance(module, nn.Linear)
        and isinstance(nf, int)
        and isinstance(nx, int)
        and isinstance(weight, nn.Parameter)
        and tuple(weight.shape) == (nx, nf)
        and isinstance(bias, nn.Parameter)
        and tuple(bias.shape) == (nf,)
        and not any(True for _ in module.children())
    )


class LoRAConv1D(LoRALinear):
    """transformers' ``Conv1D``: the same factors as a Linear, the weight transposed (PEFT's ``fan_in_fan_out``).

    Recognised by structure, so its forward is always checked against ``x @ weight + bias`` once.
    """

    copied_attributes = ("nf", "nx")
    plain_types = ()
    output_dim_in_weight: ClassVar[int] = 1

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return is_conv1d_like(module)

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.view(-1, x.size(-1))
        out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight  # transformers' own op
        return out.view(x.size()[:-1] + (self.nf,))

    def lora_weight(self, adapter: LoRAAdapter) -> torch.Tensor:
        return (adapter.lora_B.float() @ adapter.lora_A.float()).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LoRALayer.forward(self, x)

    def per_sample_forward(self, x: torch.Tensor) -> torch.Tensor:
        return LoRALayer.per_sample_forward(self, x)
