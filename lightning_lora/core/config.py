"""``LoRAConfig``: what to adapt and how. The one place its fields are listed.

Every other piece reads the fields from here: the layers take a (per-layer) ``LoRAConfig``,
the Lightning callback's flat signature mirrors :func:`dataclasses.fields` of it (a test checks),
the command line builds its ``--lora.*`` options from it, and adapter files are translated
to and from it.

Module-name patterns (``target_modules``, ``exclude_modules``, ``modules_to_save`` and the keys
of ``rank_pattern``/``alpha_pattern``) all use one syntax, :func:`matches`.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

ALL_LINEAR = "all-linear"
InitName = Literal["kaiming", "gaussian", "pissa", "olora"]
"""How the factors start (``LoRAConfig.init``)."""
INITS: tuple[str, ...] = get_args(InitName)
FROM_WEIGHT_INITS = ("pissa", "olora")
DEFAULT_INIT: InitName = "kaiming"
"""Plain factors: A drawn at random, B zero."""
"""Initialisations that take the factors from the base weight and leave the base its residual."""
BIAS_POLICIES = ("none", "all", "lora_only")


CALLBACK_ONLY_OPTIONS = (
    "module_path",
    "adapter_dir",
    "merge_on_fit_end",
    "stats_every_n_steps",
    "adapter_name",
    "load_adapters",
)
"""``LoRAInjectionCallback``'s settings beyond ``LoRAConfig``'s fields: where the adapters go, what
happens at fit end and what is logged, not what they are (the command line's ``--lora.`` group takes both)."""


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def matches(name: str, pattern: str) -> bool:
    """Whether a module's qualified ``name`` matches a ``pattern``.

    A pattern matches the full name exactly, as a dot-suffix (``"fc1"`` matches ``"net.fc1"``),
    or as a glob on either (``"layers.*"`` matches ``"net.layers.0"``).
    """
    if name == pattern or name.endswith("." + pattern):
        return True
    return _is_glob(pattern) and (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern))


def _string_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        example = f"[{value}]" if isinstance(value, str) and value else "[linear1, linear2]"
        accepted = " or 'all-linear'" if name == "target_modules" else ""
        raise ValueError(
            f"LoRAConfig.{name} must be a list of module-name patterns (e.g. {example}){accepted}, got {value!r}"
        )
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"LoRAConfig.{name} must hold non-empty strings, got {bad!r} in {value!r}")
    return list(value)


def _check_rank(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoRAConfig.{where} must be an integer >= 1, got {value!r}")
    return value


def _check_alpha(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"LoRAConfig.{where} must be a finite number > 0, got {value!r}")
    return float(value)


def _pattern_map(name: str, value: Any, check) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"LoRAConfig.{name} must map module-name patterns to values, got {value!r}")
    return {_string_list(name, [k])[0]: check(f"{name}[{k!r}]", v) for k, v in value.items()}


@dataclass
class LoRAConfig:
    """What to adapt and how; validated on construction.

    Args:
        rank: Rank ``r`` of the update ``B A``. Even 1 works well (LoRA paper, section 7.2).
        alpha: Numerator of the scale; the update is multiplied by ``alpha / rank``.
        dropout: Dropout probability on the adapter branch's input only (the base path never
            sees it, so the frozen model's behaviour is unchanged).
        target_modules: Module-name patterns to adapt, or ``"all-linear"`` for every
            Linear-like layer (``nn.Linear``, transformers' ``Conv1D``, the projections of
            ``nn.MultiheadAttention``). Convolutions and embeddings are adapted only when named.
        exclude_modules: Patterns removed from the targets; naming a container excludes
            everything inside it.
        use_dora: Learn a per-output magnitude as well (DoRA; Linear, Conv and Conv1D layers).
        use_rslora: Scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        init: How the factors start. ``"kaiming"`` (uniform, as ``nn.Linear`` does) or
            ``"gaussian"`` (normal with std ``1 / rank``) for the factor that is not zero; or
            from the base weight, PEFT's definitions: ``"pissa"`` (Meng et al., 2024: ``A`` and
            ``B`` from the top ``rank`` singular triplets) or ``"olora"`` (Büyükakyüz, 2024: from
            its QR decomposition). Those two leave the layer its residual weight
            ``W - scale * B A``, so outputs at injection equal the base's (up to rounding);
            linear layers only, the model's first adapter only.
        bias: Which biases train: ``"none"``, ``"all"`` (every parameter whose name holds
            "bias", as PEFT does) or ``"lora_only"`` (biases of adapted layers). The base's own
            values are kept aside, so disabling the adapter restores them.
        modules_to_save: Patterns of modules trained fully (a new head, say). Each gets a
            trainable copy; the original is kept, so disabling the adapter restores it.
        rank_pattern: Per-layer ranks by module-name pattern, e.g. ``{"linear3": 4}``; the
            first matching pattern wins.
        alpha_pattern: Per-layer alphas by module-name pattern.

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
    init: InitName = DEFAULT_INIT
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank = _check_rank("rank", self.rank)
        self.alpha = _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
        if self.init in FROM_WEIGHT_INITS and self.use_dora:
            raise ValueError(f"LoRAConfig.init={self.init!r} with use_dora is not supported; choose one of them")
        if self.bias not in BIAS_POLICIES:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS_POLICIES}, got {self.bias!r}")
        for flag in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRAConfig.{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.target_modules != ALL_LINEAR:
            self.target_modules = _string_list("target_modules", self.target_modules)
            if not self.target_modules:
                raise ValueError(
                    f"LoRAConfig.target_modules is empty; list module names such as ['fc1'] or use {ALL_LINEAR!r}"
                )
        self.exclude_modules = _string_list("exclude_modules", self.exclude_modules)
        self.modules_to_save = _string_list("modules_to_save", self.modules_to_save)
        self.rank_pattern = _pattern_map("rank_pattern", self.rank_pattern, _check_rank)
        self.alpha_pattern = _pattern_map("alpha_pattern", self.alpha_pattern, _check_alpha)

    @property
    def scale(self) -> float:
        """The factor on ``B A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def for_layer(self, *names: str) -> LoRAConfig:
        """This config with ``rank`` and ``alpha`` resolved for a layer registered under ``names``.

        The first pattern (in the mapping's order) that matches any of the names wins.
        """

        def resolve(patterns: dict[str, Any], default: Any) -> Any:
            return next((v for p, v in patterns.items() if any(matches(n, p) for n in names)), default)

        rank, alpha = resolve(self.rank_pattern, self.rank), resolve(self.alpha_pattern, self.alpha)
        return replace(self, rank=rank, alpha=alpha, rank_pattern={}, alpha_pattern={})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (lists, not tuples)."""
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """The fields, in declaration order: what the callback and the command line mirror."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Build from :meth:`to_dict` output, refusing keys this version does not know."""
        if not isinstance(data, dict):
            raise ValueError(f"a LoRA config must be a mapping of its fields, got {type(data).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown LoRAConfig field(s) {unknown}; known fields are {sorted(known)} "
                "(was this written by a newer lightning-lora?)"
            )
        return cls(**data)
