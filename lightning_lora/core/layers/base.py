"""What every LoRA layer shares: the factors, the scale, dropout, the switch, merging and DoRA.

A LoRA layer keeps a frozen base weight ``W`` and learns a low-rank update::

    y = base(x; W, b) + scale * B (A (dropout(x)))

``B`` starts at zero (for embeddings ``A`` does, as in PEFT), so an adapted layer starts out
computing exactly what the base layer computes (Hu et al., 2021, "LoRA", arXiv:2106.09685,
section 4.1). ``scale`` is ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski,
2023, arXiv:2312.03732).

DoRA (Liu et al., 2024, arXiv:2402.09353) splits the adapted weight into a per-output magnitude
``m`` and a direction ``V = W + scale * B A``: ``W' = m * V / ||V||``, the norm taken per output.
As the paper suggests (section 4.3) ``||V||`` is a constant for the backward pass, and as PEFT
does the bias is left out of the magnitude scaling.

A subclass says only what differs between layer types: the factors' shapes, the base operation,
the low-rank branch, and where the output dimension sits in the weight.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.core.config import LoRAConfig

BASE_PREFIX = "lora_base_"
"""Buffers named ``lora_base_<param>`` hold a trained bias's original values."""


def autocast_off(device: torch.device):
    """Merges must not run under autocast: bf16 autocast makes them ~1000x less accurate."""
    return torch.autocast(device_type=device.type, enabled=False)


def robust_norm(weight: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The L2 norm over ``dims`` (kept), safe from overflow and underflow.

    Each slice is divided by the power of two at its largest magnitude first (exact), so weights
    of 1e-25 or 1e20 neither vanish nor overflow when squared in fp32.
    """
    peak = weight.detach().abs().amax(dim=dims, keepdim=True)
    power = torch.ldexp(torch.ones_like(peak), torch.frexp(peak).exponent)
    return torch.linalg.vector_norm(weight / power, dim=dims, keepdim=True) * power


class LoRALayer(nn.Module):
    """A base layer plus a low-rank adapter, keeping the base's parameter names.

    The base's parameters are re-registered on this module as they are (``fc1.weight`` stays
    ``fc1.weight``); only ``lora_A``, ``lora_B`` and, for DoRA, ``lora_magnitude`` are new keys.
    Adapter tensors are fp32 whatever the base dtype, so small updates are not lost to rounding.

    Merging is explicit (:meth:`merge`, :meth:`unmerge`), never a side effect of
    ``train()``/``eval()``. A merge never writes into the base tensor: the merged weight is a new
    tensor and the base one is kept aside. So a weight tied to another module (an embedding
    shared with an output layer) is never changed, :meth:`unmerge` is exact, a disabled layer
    still computes the base output, and ``state_dict()`` reports the base weight.

    Args:
        base: The layer to adapt. Its parameters are shared, not copied.
        config: This layer's settings (``rank``/``alpha`` already resolved for it).
    """

    linear_like: ClassVar[bool] = False
    """Whether ``"all-linear"`` includes this layer type."""
    supports_dora: ClassVar[bool] = True
    """Whether DoRA is defined for this layer type (PEFT's definitions)."""
    adapter_names: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "lora_magnitude": "lora_magnitude_vector",
    }
    """The adapter tensors, and what PEFT's files call each one."""
    weight_name: ClassVar[str] = "weight"
    """The base parameter the update is added to."""
    copied_attributes: ClassVar[tuple[str, ...]] = ()
    """Plain attributes of the base layer that code around it may read."""
    plain_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    """Types whose forward :meth:`base_forward` reproduces op for op; other forwards are probed."""

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        """Whether this class adapts ``module``."""
        raise NotImplementedError

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        if config.use_dora and not self.supports_dora:
            raise ValueError(
                f"DoRA is defined for Linear, Conv and Conv1D layers, not for {type(base).__name__}; "
                "set use_dora=False or exclude this layer"
            )
        self.__dict__["base_layer"] = base  # the original module, unregistered: its parameters are ours
        for attr in self.copied_attributes:
            setattr(self, attr, getattr(base, attr))
        for name in self.parameter_names(base):
            self.register_parameter(name, getattr(base, name))
        self.register_buffer("lora_unmerged_weight", None, persistent=False)
        self.config = config
        self.scale = config.scale
        device = self.base_weight().device
        a_shape, b_shape = self.factor_shapes(config.rank)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.use_dora:
            shape = self.output_shape()
            self.lora_magnitude = nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32))
        self.enabled = True
        self.reset_lora_parameters()
        self.register_state_dict_post_hook(_report_base_weight)
        self.register_load_state_dict_pre_hook(_refuse_loading_while_merged)
        self._check_base_forward(base)

    # -- what a layer type defines ------------------------------------------------------------

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A`` and ``lora_B`` (PEFT's)."""
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's own operation with the given weight and bias (bit for bit)."""
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B A x`` for an input that already went through dropout."""
        raise NotImplementedError

    def lora_weight(self) -> torch.Tensor:
        """``B A`` in fp32, laid out like the base weight (unscaled)."""
        raise NotImplementedError

    def output_shape(self) -> tuple[int, ...]:
        """A shape that broadcasts a per-output vector against the layer's output (DoRA's magnitude)."""
        raise NotImplementedError

    optional_parameters: ClassVar[tuple[str, ...]] = ("bias",)
    """Parameters the base type may register as ``None`` (``bias=False``): kept as ``None`` here too."""

    output_dim_in_weight: ClassVar[int] = 0
    """Which dimension of the weight indexes outputs (1 for transformers' Conv1D)."""

    def probe_input(self) -> torch.Tensor:
        """A small input for :meth:`_check_base_forward`."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------

    @classmethod
    def parameter_names(cls, base: nn.Module) -> list[str]:
        """The base's own parameters, and the optional ones it holds as ``None`` (no bias)."""
        names = [name for name, _ in base.named_parameters(recurse=False)]
        return names + [n for n in cls.optional_parameters if n not in names and getattr(base, n, 0) is None]

    def _check_base_forward(self, base: nn.Module) -> None:
        """Refuse a layer whose own ``forward`` computes something else than :meth:`base_forward`.

        A subclass that standardises its weight, pads on the fly or scales its output would be
        replaced by the plain operation silently; it is run once on a small input instead, and
        adapted only if it computes exactly what the plain operation does.
        """
        if any(type(base).forward is t.forward for t in self.plain_types) or self.base_weight().is_meta:
            return
        probe = self.probe_input()
        with torch.no_grad():
            same = torch.equal(base(probe), self.base_forward(probe, self.base_weight(), getattr(self, "bias", None)))
        if not same:
            raise ValueError(
                f"{type(base).__name__} changes what its base type computes (its own forward differs from the "
                f"plain {self.plain_types[0].__name__ if self.plain_types else 'operation'}); LoRA would replace "
                "that forward. Exclude it from the targets (or adapt the layers inside it)."
            )

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def merged(self) -> bool:
        """Whether the update currently lives inside the weight."""
        return self.lora_unmerged_weight is not None

    def base_weight(self) -> torch.Tensor:
        """The weight without the update (also while merged)."""
        return self.lora_unmerged_weight if self.merged else getattr(self, self.weight_name)

    def bias_names(self) -> list[str]:
        """This layer's own bias parameters (PEFT's rule: the name holds "bias")."""
        return [n for n, p in self.named_parameters(recurse=False) if "bias" in n and not n.startswith("lora_")]

    def base_bias(self, name: str = "bias") -> torch.Tensor | None:
        """A bias as the base had it: its kept-aside value if it trains."""
        kept = getattr(self, BASE_PREFIX + name, None)
        return kept if kept is not None else getattr(self, name, None)

    def reset_lora_parameters(self) -> None:
        """Re-initialise the adapter so the layer equals its base again."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters() on a merged layer; call unmerge() first")
        with torch.no_grad():
            self.init_factors()
            if self.config.use_dora:
                self.lora_magnitude.copy_(self.weight_norm(self.base_weight().float()))

    def init_factors(self) -> None:
        """Kaiming-uniform (or gaussian) ``A`` and zero ``B``, as PEFT does."""
        if self.config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        self.lora_B.zero_()

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||weight||`` per output, shaped like the output (DoRA)."""
        dims = tuple(d for d in range(weight.dim()) if d != self.output_dim_in_weight)
        return robust_norm(weight, dims).reshape(self.output_shape())

    def _as_weight_layout(self, per_output: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.base_weight().dim()
        shape[self.output_dim_in_weight] = -1
        return per_output.reshape(shape)

    def _lora_product(self) -> torch.Tensor:
        return self.lora_weight() * self.scale

    def dora_factor(self, base_weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + scale * B A||``, the norm detached (DoRA section 4.3), shaped like the output."""
        with autocast_off(base_weight.device):
            norm = self.weight_norm(base_weight.float() + self._lora_product().detach()).detach()
        return self.lora_magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def delta_weight(self) -> torch.Tensor:
        """What :meth:`merge` adds to the base weight, in fp32: ``W_merged - W``."""
        base = self.base_weight()
        with torch.no_grad(), autocast_off(base.device):
            if not self.config.use_dora:
                return self._lora_product()
            adapted = base.float() + self._lora_product()
            return self._as_weight_layout(self.dora_factor(base)) * adapted - base.float()

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with right now, differentiable in the adapter.

        For parents that read a child's weight directly instead of calling it
        (``nn.MultiheadAttention`` and its ``out_proj``).
        """
        if not self.enabled:
            return self.base_weight()
        weight = getattr(self, self.weight_name)
        if self.merged:
            return weight
        adapted = weight.float() + self._lora_product()
        if self.config.use_dora:
            adapted = self._as_weight_layout(self.dora_factor(weight)) * adapted
        return adapted.to(weight.dtype)

    def effective_bias(self, name: str = "bias") -> torch.Tensor | None:
        """The bias this layer computes with right now (trained while enabled, base while disabled)."""
        return getattr(self, name) if self.enabled else self.base_bias(name)

    def merge(self) -> None:
        """Fold the update into a new weight tensor (fp32 arithmetic, then the base dtype). Idempotent."""
        if self.merged:
            return
        base = getattr(self, self.weight_name)
        with torch.no_grad():
            merged = (base.float() + self.delta_weight()).to(base.dtype)
        self.register_buffer("lora_unmerged_weight", base, persistent=False)  # the Parameter itself: ties survive
        setattr(self, self.weight_name, nn.Parameter(merged, requires_grad=False))

    def unmerge(self) -> None:
        """Put the base weight back (the very tensor, so ties survive). A no-op if not merged."""
        if not self.merged:
            return
        base = self.lora_unmerged_weight
        self.lora_unmerged_weight = None
        setattr(self, self.weight_name, base if isinstance(base, nn.Parameter) else nn.Parameter(base, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_forward(x, self.base_weight(), self.base_bias())
        out = self.base_forward(x, getattr(self, self.weight_name), self.bias)
        if self.merged:
            return out
        if not self.config.use_dora:
            return out + self.update(self.lora_dropout(x)).to(out.dtype)
        return out + self.dora_extra(x, out).to(out.dtype)

    def dora_extra(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output, as PEFT computes it.

        ``(m/||V|| - 1) * W x + m/||V|| * scale * B A x``: exactly zero at initialisation. With
        dropout active the first term is taken on the dropped-out input as well (PEFT's choice).
        """
        factor = self.dora_factor(self.weight)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            x = self.lora_dropout(x)
            base_part = self.base_forward(x, self.weight, None)
        else:
            base_part = out if self.bias is None else out - self.bias.reshape(self.output_shape())
        return (factor - 1) * base_part + factor * self.update(x)

    def to_base(self) -> nn.Module:
        """The original module, holding this layer's current parameters (merged or not)."""
        base = self.base_layer
        for name in self.parameter_names(base):
            setattr(base, name, getattr(self, name))
        return base.train(self.training)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.config.use_dora else "LoRA"
        return (
            f"{type(self.base_layer).__name__}, {kind} rank={self.rank}, scale={self.scale:g}, "
            f"merged={self.merged}, enabled={self.enabled}"
        )


def keep_base_bias(module: nn.Module, name: str) -> None:
    """Make ``module.<name>`` trainable, keeping its present values aside as the base's."""
    param = getattr(module, name)
    if param is None or hasattr(module, BASE_PREFIX + name):
        return
    module.register_buffer(BASE_PREFIX + name, param.detach().clone(), persistent=False)
    param.requires_grad_(True)


def kept_biases(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(module, parameter name, qualified name)`` for every bias trained beside a kept base value."""
    found = []
    for module_name, module in model.named_modules():
        for buffer_name, _ in module.named_buffers(recurse=False):
            if buffer_name.startswith(BASE_PREFIX):
                param = buffer_name[len(BASE_PREFIX) :]
                found.append((module, param, f"{module_name}.{param}" if module_name else param))
    return found


def _refuse_loading_while_merged(module: LoRALayer, state_dict: dict, prefix: str, *args: Any) -> None:
    if module.merged:
        raise RuntimeError(
            f"loading a state dict into merged LoRA layer '{prefix.rstrip('.')}'; call unmerge_lora(model) first"
        )


def _report_base_weight(module: LoRALayer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if module.merged:
        state_dict[prefix + module.weight_name] = module.lora_unmerged_weight.detach()
