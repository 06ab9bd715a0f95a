"""What every LoRA layer shares: the factors, the scale, dropout, the switch, merging and DoRA.

A LoRA layer keeps a frozen base weight ``W`` and learns a low-rank update::

    y = base(x; W, b) + scale * B (A (dropout(x)))

``B`` starts at zero (for embeddings ``A`` does, as in PEFT), so an adapted layer starts out
computing exactly what the base layer computes (Hu et al., 2021, "LoRA", arXiv:2106.09685,
section 4.1). ``scale`` is ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski,
2023, arXiv:2312.03732).

DoRA's arithmetic lives in :mod:`.dora`, the one adapter's tensors in :mod:`.adapter`. This module is
longer than 400 lines because one class holds the forward, merge and by-name machinery every layer
type shares: the invariants they keep together (disabled == base bit for bit, merged == unmerged,
each adapter defined against the base alone) are easier to check in one place than across files.

A layer holds any number of named adapters (:class:`LoRAAdapter`, PEFT's ``add_adapter``), each
with its own rank, scale, dropout and factors. The active ones add their updates (PEFT's
``set_adapter([...])``); each adapter's update is computed against the base alone, so adding an
adapter never changes what another computes. A subclass says only what differs between layer
types: the factors' shapes, the base operation, the low-rank branch, and where the output
dimension sits in the weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.core.config import FROM_WEIGHT_INITS, LoRAConfig
from lightning_lora.core.layers.adapter import BASE_SAMPLE, DEFAULT_ADAPTER, LoRAAdapter, SampleRouting
from lightning_lora.core.layers.biases import BASE_PREFIX, keep_base_bias, kept_biases
from lightning_lora.core.layers.dora import DoRAArithmetic, autocast_off, robust_norm

__all__ = [  # re-exported: the layer family's one import point
    "BASE_PREFIX",
    "BASE_SAMPLE",
    "DEFAULT_ADAPTER",
    "LoRAAdapter",
    "LoRALayer",
    "SampleRouting",
    "autocast_off",
    "keep_base_bias",
    "kept_biases",
    "robust_norm",
]


class LoRALayer(DoRAArithmetic, nn.Module):
    """A base layer plus named low-rank adapters, keeping the base's parameter names.

    The base's parameters are re-registered on this module as they are (``fc1.weight`` stays
    ``fc1.weight``); the adapters live under ``lora_adapters`` (one :class:`LoRAAdapter` each).
    ``active_adapters`` lists the ones forward adds (in the order given); ``enabled`` switches
    them all off at once (``disable_lora``).

    Merging is explicit (:meth:`merge`, :meth:`unmerge`), never a side effect of
    ``train()``/``eval()``. A merge never writes into the base tensor: the merged weight is a new
    tensor, base plus every merged adapter's update in fp32, and the base one is kept aside. So a
    weight tied to another module (an embedding shared with an output layer) is never changed,
    :meth:`unmerge` is exact, a disabled layer still computes the base output, and
    ``state_dict()`` reports the base weight.

    ``lora_A``, ``lora_B``, ``lora_magnitude``, ``lora_dropout``, ``config``, ``scale`` and
    ``rank`` read the primary adapter's (``"default"``, or the first added): what a layer with one
    adapter, the common case, is asked.

    Args:
        base: The layer to adapt. Its parameters are shared, not copied.
        config: The first adapter's settings (``rank``/``alpha`` already resolved for it).
        adapter_name: The first adapter's name.
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
    """The tensors of one adapter, and what PEFT's files call each one."""
    weight_name: ClassVar[str] = "weight"
    """The base parameter the update is added to."""
    copied_attributes: ClassVar[tuple[str, ...]] = ()
    """Plain attributes of the base layer that code around it may read."""
    plain_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    """Types whose forward :meth:`base_forward` reproduces op for op; other forwards are probed."""
    batch_dim: ClassVar[int] = 0
    """Which dimension of the input indexes samples (for per-sample adapters)."""

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        """Whether this class adapts ``module``."""
        raise NotImplementedError

    def __init__(self, base: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.__dict__["base_layer"] = base  # the original module, unregistered: its parameters are ours
        for attr in self.copied_attributes:
            setattr(self, attr, getattr(base, attr))
        for name in self.parameter_names(base):
            self.register_parameter(name, getattr(base, name))
        self.register_buffer("lora_unmerged_weight", None, persistent=False)
        self.register_buffer("lora_original_weight", None, persistent=False)
        self.lora_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self.sample_adapters: SampleRouting | None = None
        self.enabled = True
        self._check_base_forward(base)
        self.add_adapter(adapter_name, self.new_adapter(config))
        self.register_state_dict_post_hook(_report_base_weight)
        self.register_load_state_dict_pre_hook(_refuse_loading_while_merged)

    # -- what a layer type defines ------------------------------------------------------------

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A`` and ``lora_B`` (PEFT's)."""
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's own operation with the given weight and bias (bit for bit)."""
        raise NotImplementedError

    def update(self, x: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        """``scale * B A x`` of ``adapter`` for an input that already went through dropout."""
        raise NotImplementedError

    def lora_weight(self, adapter: LoRAAdapter) -> torch.Tensor:
        """``B A`` of ``adapter`` in fp32, laid out like the base weight (unscaled)."""
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

    # -- adapters by name ---------------------------------------------------------------------

    def new_adapter(self, config: LoRAConfig) -> LoRAAdapter:
        """A freshly initialised adapter for this layer (not attached yet): this layer plus it equals the base.

        Raises:
            ValueError: ``config`` asks for DoRA on a layer type it is not defined for.
        """
        if config.use_dora and not self.supports_dora:
            raise ValueError(
                f"DoRA is defined for Linear, Conv and Conv1D layers, not for {type(self.base_layer).__name__}; "
                "set use_dora=False or exclude this layer"
            )
        adapter = LoRAAdapter(config, self.factor_shapes(config.rank), self.output_shape(), self.base_weight().device)
        self.init_adapter(adapter)
        return adapter

    def add_adapter(self, name: str, adapter: LoRAAdapter) -> None:
        """Attach ``adapter`` (from :meth:`new_adapter`) under ``name``; active only if ``active_adapters`` lists it."""
        if name in self.lora_adapters:
            raise ValueError(f"this layer already holds an adapter named {name!r}")
        adapter.train(self.training)
        self.lora_adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Remove the adapter ``name`` (not merged) from this layer."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into this layer's weight; unmerge it first")
        del self.lora_adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def factor_groups(self) -> int:
        """How many independent blocks the factors split into (a grouped convolution's groups; 1 elsewhere)."""
        return 1

    def companion_layers(self) -> list[LoRALayer]:
        """Adapted layers inside this one that a target's adapter also covers (an attention's ``out_proj``)."""
        return []

    def adapters_in_use(self) -> list[tuple[str, LoRAAdapter]]:
        """The active adapters this layer holds that are not merged: what forward adds to the weight it uses."""
        return [
            (n, self.lora_adapters[n])
            for n in self.active_adapters
            if n in self.lora_adapters and n not in self.merged_adapters
        ]

    @property
    def primary(self) -> LoRAAdapter:
        """The adapter ``"default"``, or the first added: the one the single-adapter names read."""
        if DEFAULT_ADAPTER in self.lora_adapters:
            return self.lora_adapters[DEFAULT_ADAPTER]
        return next(iter(self.lora_adapters.values()))

    @property
    def lora_A(self) -> nn.Parameter:
        return self.primary.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.primary.lora_B

    @property
    def lora_magnitude(self) -> nn.Parameter:
        if not self.primary.use_dora:
            raise AttributeError("this layer's adapter is not DoRA: it has no lora_magnitude")
        return self.primary.lora_magnitude

    @property
    def lora_dropout(self) -> nn.Module:
        return self.primary.lora_dropout

    @property
    def config(self) -> LoRAConfig:
        return self.primary.config

    @property
    def scale(self) -> float:
        return self.primary.scale

    @property
    def rank(self) -> int:
        return self.primary.rank

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
    def merged(self) -> bool:
        """Whether any adapter's update currently lives inside the weight."""
        return self.lora_unmerged_weight is not None

    def base_weight(self) -> torch.Tensor:
        """The weight without any update (also while merged)."""
        return self.lora_unmerged_weight if self.merged else getattr(self, self.weight_name)

    def bias_names(self) -> list[str]:
        """This layer's own bias parameters (PEFT's rule: the name holds "bias")."""
        return [n for n, p in self.named_parameters(recurse=False) if "bias" in n and not n.startswith("lora_")]

    def base_bias(self, name: str = "bias") -> torch.Tensor | None:
        """A bias as the base had it: its kept-aside value if it trains."""
        kept = getattr(self, BASE_PREFIX + name, None)
        return kept if kept is not None else getattr(self, name, None)

    def reset_lora_parameters(self, names: Iterable[str] | None = None) -> None:
        """Re-initialise adapters (all by default) so that each adds nothing again."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters() on a merged layer; call unmerge() first")
        for name in self.lora_adapters if names is None else names:
            self.init_adapter(self.lora_adapters[name])

    def init_adapter(self, adapter: LoRAAdapter) -> None:
        """Initialise ``adapter``'s factors (and DoRA magnitude) so that this layer computes what its base does."""
        with torch.no_grad():
            if adapter.config.init in FROM_WEIGHT_INITS:
                self.init_from_weight(adapter)
            else:
                self.init_factors(adapter)
            if adapter.use_dora:
                adapter.lora_magnitude.copy_(self.weight_norm(self.base_weight().float()))

    def init_from_weight(self, adapter: LoRAAdapter) -> None:
        """PiSSA / OLoRA: factors from the base weight, and the layer left its residual (linear layers define it)."""
        raise ValueError(
            f"init={adapter.config.init!r} (PiSSA/OLoRA) is defined for linear layers, not for "
            f"{type(self.base_layer).__name__}; exclude it from the targets or use init='kaiming'"
        )

    def original_weight(self) -> torch.Tensor:
        """The weight the base had before any adapter: what ``disable_lora`` runs (PiSSA/OLoRA keep it aside)."""
        return self.lora_original_weight if self.lora_original_weight is not None else self.base_weight()

    def take_residual(self, residual: torch.Tensor) -> None:
        """Run on ``residual`` instead of the base weight from now on, the original kept aside (never written)."""
        original = getattr(self, self.weight_name)
        if self.lora_original_weight is None:
            self.lora_original_weight = original.detach()
        setattr(self, self.weight_name, nn.Parameter(residual.to(original.dtype), requires_grad=False))

    def restore_original_weight(self) -> None:
        """Give the layer its original weight back (the very tensor the base module holds), dropping the residual."""
        if self.lora_original_weight is not None:
            self.unmerge()
            kept, held = self.lora_original_weight, getattr(self.base_layer, self.weight_name)
            same_place = held.device == kept.device and held.dtype == kept.dtype
            setattr(self, self.weight_name, held if same_place else nn.Parameter(kept, requires_grad=False))
            self.lora_original_weight = None

    def init_factors(self, adapter: LoRAAdapter) -> None:
        """Kaiming-uniform (or gaussian) ``A`` and zero ``B``, as PEFT does."""
        if adapter.config.init == "kaiming":
            nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(adapter.lora_A, std=1.0 / adapter.rank)
        adapter.lora_B.zero_()

    def _lora_product(self, adapter: LoRAAdapter) -> torch.Tensor:
        return self.lora_weight(adapter) * adapter.scale

    def _adapter(self, name: str | None) -> LoRAAdapter:
        if name is None:
            return self.primary
        if name not in self.lora_adapters:
            raise KeyError(f"this layer holds no adapter named {name!r} (it holds {list(self.lora_adapters)})")
        return self.lora_adapters[name]

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """What merging adapter ``name`` (the primary one by default) adds to the base weight, in fp32."""
        adapter, base = self._adapter(name), self.base_weight()
        with torch.no_grad(), autocast_off(base.device):
            return self._delta(adapter, base)

    def _delta(self, adapter: LoRAAdapter, base: torch.Tensor) -> torch.Tensor:
        if not adapter.use_dora:
            return self._lora_product(adapter)
        adapted = base.float() + self._lora_product(adapter)
        return self._as_weight_layout(self.dora_factor(adapter)) * adapted - base.float()

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with right now, differentiable in the active adapters.

        For parents that read a child's weight directly instead of calling it
        (``nn.MultiheadAttention`` and its ``out_proj``).
        """
        if not self.enabled:
            return self.original_weight()
        weight = getattr(self, self.weight_name)
        in_use = self.adapters_in_use()
        if not in_use:
            return weight
        if len(in_use) == 1 and not self.merged:
            adapter = in_use[0][1]
            adapted = weight.float() + self._lora_product(adapter)
            if adapter.use_dora:
                adapted = self._as_weight_layout(self.dora_factor(adapter)) * adapted
            return adapted.to(weight.dtype)
        with autocast_off(weight.device):
            adapted = weight.float() + sum(self._delta(a, self.base_weight()) for _, a in in_use)
        return adapted.to(weight.dtype)

    def effective_bias(self, name: str = "bias") -> torch.Tensor | None:
        """The bias this layer computes with right now (trained while enabled, base while disabled)."""
        return getattr(self, name) if self.enabled else self.base_bias(name)

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold adapters (the active ones by default) into a new weight tensor: fp32 arithmetic, then the
        base dtype, the base itself kept aside. Idempotent."""
        wanted = self.active_adapters if names is None else list(names)
        new = [n for n in wanted if n in self.lora_adapters and n not in self.merged_adapters]
        if new:
            self._set_merged(self.merged_adapters + new)

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """Take adapters (all merged ones by default) out of the weight again; with none left the very
        base tensor is back (so ties survive). A no-op for adapters not merged."""
        leaving = set(self.merged_adapters if names is None else names)
        if leaving & set(self.merged_adapters):
            self._set_merged([n for n in self.merged_adapters if n not in leaving])

    def _set_merged(self, names: list[str]) -> None:
        """Make the weight the base plus exactly the updates of ``names``, recomputed from the base."""
        if self.sample_adapters is not None:
            raise RuntimeError("merging or unmerging inside an adapter_per_sample block; leave the block first")
        base = self.base_weight()
        if self.merged:
            self.lora_unmerged_weight = None
            setattr(self, self.weight_name, base if isinstance(base, nn.Parameter) else nn.Parameter(base, False))
        self.merged_adapters = list(names)
        if not names:
            return
        with torch.no_grad(), autocast_off(base.device):
            total = base.float()
            for name in names:
                total = total + self._delta(self.lora_adapters[name], base)
            merged = total.to(base.dtype)
        self.register_buffer("lora_unmerged_weight", base, persistent=False)  # the Parameter itself: ties survive
        setattr(self, self.weight_name, nn.Parameter(merged, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_forward(x, self.original_weight(), self.base_bias())
        if self.sample_adapters is not None:
            return self.per_sample_forward(x)
        out = self.base_forward(x, getattr(self, self.weight_name), getattr(self, "bias", None))
        total = out
        for _, adapter in self.adapters_in_use():
            total = total + self.adapter_output(x, out, adapter).to(out.dtype)
        return total

    def adapter_output(self, x: torch.Tensor, out: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        """What ``adapter`` adds to the layer's output ``out`` for input ``x``."""
        if not adapter.use_dora:
            return self.update(adapter.lora_dropout(x), adapter)
        return self.dora_extra(x, out, adapter)

    def per_sample_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample with its own adapter (``sample_adapters``, one name per sample; ``"__base__"`` for none).

        The base runs once on the whole batch; each adapter's update runs once, on its samples only,
        and lands at their rows (PEFT's ``adapter_names=``). No weight is copied per sample.
        """
        routing = self.sample_adapters
        if not self.is_batched(x) or x.shape[self.batch_dim] != len(routing):
            got = "no batch dimension" if not self.is_batched(x) else f"{x.shape[self.batch_dim]} samples"
            raise ValueError(
                f"adapter_per_sample was given {len(routing)} adapter names but a layer's input has {got} "
                f"(shape {tuple(x.shape)}): give one name per sample of the batch"
            )
        out = self.base_forward(x, getattr(self, self.weight_name), getattr(self, "bias", None))
        extra = None
        for name, rows in routing.rows(x.device).items():
            if name not in self.lora_adapters:
                continue
            adapter = self.lora_adapters[name]
            part_out = out.index_select(self.batch_dim, rows) if adapter.use_dora else out
            part = self.adapter_output(x.index_select(self.batch_dim, rows), part_out, adapter).to(out.dtype)
            extra = torch.zeros_like(out) if extra is None else extra
            extra = extra.index_copy(self.batch_dim, rows, part)
        return out if extra is None else out + extra

    def is_batched(self, x: torch.Tensor) -> bool:
        """Whether ``x`` has a batch dimension (``batch_dim``) for this layer type."""
        return x.dim() > self.batch_dim

    def to_base(self) -> nn.Module:
        """The original module, holding this layer's current parameters (merged or not)."""
        base = self.base_layer
        for name in self.parameter_names(base):
            setattr(base, name, getattr(self, name))
        return base.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"{type(self.base_layer).__name__}, active={self.active_adapters}, merged={self.merged_adapters}, "
            f"enabled={self.enabled}"
        )


def _refuse_loading_while_merged(module: LoRALayer, state_dict: dict, prefix: str, *args: Any) -> None:
    if module.merged:
        raise RuntimeError(
            f"loading a state dict into merged LoRA layer '{prefix.rstrip('.')}'; call unmerge_lora(model) first"
        )


def _report_base_weight(module: LoRALayer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if module.merged:
        state_dict[prefix + module.weight_name] = module.lora_unmerged_weight.detach()
