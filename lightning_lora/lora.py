"""LoRA and DoRA layers in pure PyTorch (no Lightning).

A LoRA layer keeps a frozen base weight ``W`` (out, in) and learns a low-rank update::

    y = W x + b + scale * B (A (dropout(x)))        A: (rank, in), B: (out, rank)

``B`` starts at zero, so an adapted layer starts out computing exactly what the base layer
computes (Hu et al., 2021, "LoRA", arXiv:2106.09685, section 4.1). ``scale`` is
``alpha / rank`` (so retuning ``alpha`` is rarely needed when ``rank`` changes), or
``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732), which keeps the
update's size stable at large ranks.

DoRA (Liu et al., 2024, arXiv:2402.09353) splits the adapted weight into a per-output-row
magnitude ``m`` and a direction ``V = W + scale * B A``: ``W' = m * V / ||V||_row``. As the paper
suggests (section 4.3), ``||V||`` is treated as a constant in the backward pass; as PEFT does,
the bias is left out of the magnitude scaling.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

ALL_LINEAR = "all-linear"
_INITS = ("kaiming", "gaussian")
_BIAS_POLICIES = ("none", "all", "lora_only")


def _string_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"LoRAConfig.{name} must be a list of module-name patterns, got {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"LoRAConfig.{name} must hold non-empty strings, got {bad!r} in {value!r}")
    return list(value)


@dataclass
class LoRAConfig:
    """What to adapt and how; validated on construction.

    Args:
        rank: Rank ``r`` of the update ``B A``. Even 1 works well (LoRA paper, section 7.2).
        alpha: Numerator of the scale; the update is multiplied by ``alpha / rank``.
        dropout: Dropout probability on the adapter branch's input only (the base path never
            sees it, so the frozen model's behaviour is unchanged).
        target_modules: Module-name patterns to adapt, or ``"all-linear"`` for every
            ``nn.Linear``. A pattern matches a module's full name exactly, as a dot-suffix
            (``"fc1"`` matches ``"net.fc1"``), or as a glob (``"layers.*"``).
        exclude_modules: Patterns (same syntax) removed from the targets.
        use_dora: Learn a per-output-row magnitude as well (DoRA).
        use_rslora: Scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        init: How ``A`` starts: ``"kaiming"`` (uniform, as ``nn.Linear`` does) or
            ``"gaussian"`` (normal with std ``1 / rank``). ``B`` always starts at zero.
        bias: Which biases train: ``"none"``, ``"all"`` (every bias in the model) or
            ``"lora_only"`` (biases of adapted layers). Trained biases are saved with the adapter.
        modules_to_save: Patterns of modules trained fully (a new head, say). Each gets a
            trainable copy; the original is kept, so disabling the adapter restores it.

    Raises:
        ValueError: naming the field and the bad value.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] = field(default_factory=list)
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"LoRAConfig.alpha must be a number > 0, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ValueError(f"LoRAConfig.init must be one of {_INITS}, got {self.init!r}")
        if self.bias not in _BIAS_POLICIES:
            raise ValueError(f"LoRAConfig.bias must be one of {_BIAS_POLICIES}, got {self.bias!r}")
        for flag in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRAConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.target_modules != ALL_LINEAR:
            self.target_modules = _string_list("target_modules", self.target_modules)
            if not self.target_modules:
                raise ValueError(
                    f"LoRAConfig.target_modules is empty; list module names such as ['fc1'] or use {ALL_LINEAR!r}"
                )
        self.exclude_modules = _string_list("exclude_modules", self.exclude_modules)
        self.modules_to_save = _string_list("modules_to_save", self.modules_to_save)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @property
    def scale(self) -> float:
        """The factor on ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (lists, not tuples)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Build from :meth:`to_dict` output, refusing keys this version does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown LoRAConfig field(s) {unknown}; known fields are {sorted(known)} "
                "(was this written by a newer lightning-lora?)"
            )
        return cls(**data)


def _autocast_off(device: torch.device):
    """Merges must not run under autocast: bf16 autocast makes them ~1000x less accurate."""
    return torch.autocast(device_type=device.type, enabled=False)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a low-rank adapter, keeping the base's parameter names.

    The base ``weight`` and ``bias`` Parameters are re-registered on this module as they are,
    so ``fc1.weight`` stays ``fc1.weight`` and only ``fc1.lora_A``, ``fc1.lora_B`` (and for
    DoRA ``fc1.lora_magnitude``) are new keys. Adapter tensors are always fp32, whatever the
    base dtype or autocast, so small updates are not lost to rounding.

    Merging is explicit (:meth:`merge`, :meth:`unmerge`), never a side effect of
    ``train()``/``eval()``. While merged, the pre-merge weight is kept aside so that
    :meth:`unmerge` restores it bit for bit, a disabled layer still computes the base output,
    and ``state_dict()`` reports the base weight (a saved merged model can never get its
    update added twice on reload).

    Args:
        base: The layer to adapt. Its parameters are shared, not copied.
        rank, alpha, dropout, use_dora, use_rslora, init: As in :class:`LoRAConfig`.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora, init=init)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.scale = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.use_dora = use_dora
        self.init = init
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=device))
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.enabled = True
        self.reset_lora_parameters()
        self.register_state_dict_post_hook(_report_unmerged_weight)

    @property
    def merged(self) -> bool:
        """Whether the update currently lives inside ``weight``."""
        return self._unmerged_weight is not None

    def _base_weight(self) -> torch.Tensor:
        return self._unmerged_weight if self.merged else self.weight

    def reset_lora_parameters(self) -> None:
        """Re-initialise the adapter so the layer equals its base again."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters() on a merged layer; call unmerge() first")
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            self.lora_B.zero_()
            if self.use_dora:
                self.lora_magnitude.copy_(self._row_norm(self.weight.float()))

    @staticmethod
    def _row_norm(weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight, dim=1)

    def _lora_product(self) -> torch.Tensor:
        """``scale * B @ A`` in fp32 (only merges and DoRA's norm need it, never LoRA's forward)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def _dora_factor(self, base_weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + scale * B A||_row``, with the norm detached (DoRA section 4.3)."""
        with _autocast_off(base_weight.device):
            norm = self._row_norm(base_weight.float() + self._lora_product()).detach()
        return self.lora_magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def delta_weight(self) -> torch.Tensor:
        """What :meth:`merge` adds to the base weight, in fp32: ``W_merged - W``."""
        base = self._base_weight()
        with torch.no_grad(), _autocast_off(base.device):
            if not self.use_dora:
                return self._lora_product()
            merged = self._dora_factor(base)[:, None] * (base.float() + self._lora_product())
            return merged - base.float()

    def merge(self) -> None:
        """Fold the update into ``weight`` (fp32 arithmetic, then the base dtype). Idempotent."""
        if self.merged:
            return
        with torch.no_grad():
            merged = self.weight.float() + self.delta_weight()
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(merged.to(self.weight.dtype))

    def unmerge(self) -> None:
        """Restore the pre-merge weight exactly. A no-op on an unmerged layer."""
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self._base_weight(), self.bias)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if not self.use_dora and _custom_path(x, self.rank, self.weight, self.lora_A, self.lora_B):
            flat = x.reshape(-1, self.in_features)  # a 2-D base output can be accumulated into in place
            out = F.linear(flat, self.weight, self.bias)
            out = _AddLowRankUpdate.apply(out, self.lora_dropout(flat), self.lora_A, self.lora_B, self.scale)
            return out.view(*x.shape[:-1], self.out_features)
        out = F.linear(x, self.weight, self.bias)
        update = low_rank_update(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scale)
        if not self.use_dora:
            return out + update.to(out.dtype)
        factor = self._dora_factor(self.weight)
        without_bias = out if self.bias is None else out - self.bias
        # m/||V|| * (W x + s B A x) + b, written so that it is exactly the base output at init.
        return out + ((factor - 1) * without_bias + factor * update).to(out.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.merged:
            raise RuntimeError(
                f"loading a state dict into merged LoRA layer '{prefix.rstrip('.')}'; call unmerge_lora(model) first"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {kind} rank={self.rank}, scale={self.scale:g}, "
            f"merged={self.merged}, enabled={self.enabled}"
        )


def _low_rank_grads(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients for x, A and B of ``scale * x A^T B^T``, skinny products in their fast layouts.

    Autograd's generic backward computes ``g @ B`` and ``g^T @ h``; at low rank, on CPU BLAS,
    those shapes run about 3x slower than the same products taken as ``(B^T @ g^T)^T`` and
    ``(h^T @ g)^T``, and they are most of what LoRA adds to the frozen layer's cost.
    """
    x, lora_A, lora_B, hidden = ctx.saved_tensors
    first = 1 if ctx.adds_into_output else 0
    needs_x, needs_A, needs_B = ctx.needs_input_grad[first : first + 3]
    # Measured (benchmarks/layer.py): the transposed forms win 2-3x at rank <= 8 with a real
    # batch; at rank 64, or a batch of 10, BLAS's own layout is as fast or faster.
    if lora_B.shape[1] <= 8 and grad.shape[0] >= 32:
        grad_B = (hidden.t() @ grad).t() if needs_B else None  # (out, rank)
        grad_hidden = (lora_B.t() @ grad.t()).t() * ctx.scale  # (batch, rank)
    else:
        grad_B = grad.t() @ hidden if needs_B else None
        grad_hidden = (grad @ lora_B) * ctx.scale
    grad_A = grad_hidden.t() @ x if needs_A else None  # (rank, in)
    grad_x = grad_hidden @ lora_A if needs_x else None  # (batch, in)
    return grad_x, grad_A, grad_B


class _LowRankUpdate(torch.autograd.Function):
    """``scale * x A^T B^T`` for 2-D ``x`` (a new tensor)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale):
        hidden = (x @ lora_A.t()) * scale  # (batch, rank)
        ctx.save_for_backward(x, lora_A, lora_B, hidden)
        ctx.scale, ctx.adds_into_output = scale, False
        return hidden @ lora_B.t()  # (batch, out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (*_low_rank_grads(ctx, grad), None)


class _AddLowRankUpdate(torch.autograd.Function):
    """``out += scale * x A^T B^T`` in place, inside the matmul (beta=1 accumulation).

    The base output is used as the matmul's accumulator, so no (batch, out) temporary is
    allocated and no separate addition pass runs; its gradient passes through untouched.
    """

    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, scale):
        hidden = (x @ lora_A.t()) * scale  # (batch, rank)
        ctx.save_for_backward(x, lora_A, lora_B, hidden)
        ctx.scale, ctx.adds_into_output = scale, True
        ctx.mark_dirty(out)
        return out.addmm_(hidden, lora_B.t())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (grad, *_low_rank_grads(ctx, grad), None)


def _custom_path(x: torch.Tensor, rank: int, *tensors: torch.Tensor) -> bool:
    """Whether the custom Functions should run, rather than plain ``F.linear`` ops.

    Only in full precision (autocast gets plain, castable ops), and only where they measured
    faster (benchmarks/layer.py): at low rank, or with many rows. At rank 64 and batch 64
    autograd's own ops are a little faster.
    """
    if torch.is_autocast_enabled(x.device.type) or any(t.dtype != x.dtype for t in tensors):
        return False
    return rank <= 8 or x.numel() // x.shape[-1] >= 256


def low_rank_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B (A x)`` over the last dimension of ``x``, never forming ``B A``."""
    if not _custom_path(x, lora_A.shape[0], lora_A, lora_B):
        return F.linear(F.linear(x, lora_A) * scale, lora_B)  # scaling the (..., rank) tensor is cheapest
    flat = x.reshape(-1, x.shape[-1])
    return _LowRankUpdate.apply(flat, lora_A, lora_B, scale).view(*x.shape[:-1], lora_B.shape[0])


def _report_unmerged_weight(module: LoRALinear, state_dict, prefix, local_metadata) -> None:
    if module.merged:
        state_dict[prefix + "weight"] = module._unmerged_weight.detach()


class ModuleToSave(nn.Module):
    """A module trained fully beside the adapters (``LoRAConfig.modules_to_save``).

    Forward runs a trainable copy while enabled and the frozen original while disabled, so
    ``disable_lora`` still gives the base model back bit for bit.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.trained_module.requires_grad_(True)
        self.enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self.trained_module if self.enabled else self.original_module
        return active(*args, **kwargs)
