"""Which modules a :class:`~lightning_lora.LoRAConfig` adapts, decided without changing anything.

The rules, in one place:

- ``"all-linear"`` means every Linear-like layer: ``nn.Linear``, transformers' ``Conv1D`` and
  ``nn.MultiheadAttention`` (its in-projection and ``out_proj`` together). Convolutions and
  embeddings are adapted only when named. An output layer whose weight is tied to an input
  embedding is left out, as PEFT does.
- A named pattern must match something. A module it names must be adaptable; a glob may sweep
  over containers and parameter-free modules harmlessly.
- ``exclude_modules`` removes matches; naming a container excludes everything inside it.
- A module registered under several names is one module: it is adapted once, and every name
  reaches the same adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora.core.config import ALL_LINEAR, LoRAConfig, _is_glob, matches
from lightning_lora.core.layers import LoRALayer, ModuleToSave, lora_class_for

log = logging.getLogger("lightning_lora")

ADAPTABLE = "Linear, Conv1d/2d/3d, Embedding, MultiheadAttention and transformers-style Conv1D"


@dataclass
class TargetPlan:
    """What :func:`plan_targets` decided.

    Attributes:
        targets: Modules to adapt, by their first name.
        names: Every name each target (by its first name) is registered under.
        to_save: Modules to train fully (``modules_to_save``), outermost only.
        skipped: Adaptable layers the config leaves alone, each with the reason.
    """

    targets: dict[str, nn.Module] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)
    to_save: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def describe_skipped(self, limit: int = 12) -> str | None:
        """The one info line about adaptable layers left out, or ``None``."""
        if not self.skipped:
            return None
        items = [f"{name} ({reason})" for name, reason in self.skipped.items()]
        more = f", and {len(items) - limit} more" if len(items) > limit else ""
        return f"LoRA leaves {len(items)} adaptable layer(s) as they are: " + ", ".join(items[:limit]) + more


def _all_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is registered under, in registration order."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _adaptable_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and lora_class_for(m) is not None]


def _matching(model: nn.Module, patterns: list[str], what: str) -> dict[str, nn.Module]:
    """Modules (by every name) matched by any pattern; each pattern must match at least one."""
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {n: m for n, m in model.named_modules(remove_duplicate=False) if n and matches(n, pattern)}
        if not hits:
            raise ValueError(
                f"LoRAConfig.{what} pattern {pattern!r} matches no module. "
                f"Adaptable layers in this model: {_adaptable_names(model) or 'none'}"
            )
        found.update(hits)
    return found


def _inside(name: str, outer: set[str]) -> bool:
    return any(name == o or name.startswith(o + ".") for o in outer)


def _embedding_ties(model: nn.Module) -> dict[int, str]:
    """``id(weight) -> "<embedding>.weight"`` for every embedding's weight."""
    return {id(m.weight): f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}


def _swept_by_glob(name: str, config: LoRAConfig) -> bool:
    """A glob sweeps over modules LoRA cannot adapt (containers, norms, activations) harmlessly;
    only a module named without a glob must be adaptable."""
    return not any(not _is_glob(p) and matches(name, p) for p in config.target_modules)


def _check_patterns_match(plan: TargetPlan, config: LoRAConfig) -> None:
    """Every rank/alpha pattern must match an adapted layer: a typo there would be silently ignored."""
    names = [n for aliases in plan.names.values() for n in aliases]
    for what in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(config, what):
            if not any(matches(n, pattern) for n in names):
                raise ValueError(
                    f"LoRAConfig.{what} pattern {pattern!r} matches no adapted layer; "
                    f"adapted layers: {sorted(plan.targets)}"
                )


def plan_targets(model: nn.Module, config: LoRAConfig) -> TargetPlan:
    """Decide what ``config`` adapts in ``model`` (see the module docstring for the rules).

    Raises:
        ValueError: a pattern matches nothing (the message lists the adaptable layers), a named
            module cannot be adapted, or nothing at all is selected.
    """
    all_names = _all_names(model)
    first_name = {id(m): all_names[id(m)][0] for _, m in model.named_modules()}
    saved_names = {
        n for m in _matching(model, config.modules_to_save, "modules_to_save").values() for n in all_names[id(m)]
    }
    excluded_names = {
        n for m in _matching(model, config.exclude_modules, "exclude_modules").values() for n in all_names[id(m)]
    }
    parents = {
        f"{name}.{child}" if name else child: parent
        for name, parent in model.named_modules(remove_duplicate=False)
        for child, _ in parent.named_children()
    }
    ties = _embedding_ties(model)
    plan = TargetPlan()

    def in_attention(name: str) -> bool:
        return isinstance(parents.get(name), nn.MultiheadAttention)

    def blocked(module: nn.Module) -> str | None:
        names = all_names[id(module)]
        if any(_inside(n, saved_names) for n in names):
            return "inside modules_to_save"
        if any(_inside(n, excluded_names) for n in names):
            return "excluded"
        return None

    if config.target_modules == ALL_LINEAR:
        candidates = {}
        for name, module in model.named_modules(remove_duplicate=False):
            cls = lora_class_for(module)
            if not name or cls is None or in_attention(name):
                continue
            if not cls.linear_like:
                plan.skipped.setdefault(first_name[id(module)], f"{type(module).__name__}: name it to adapt it")
            elif id(getattr(module, "weight", None)) in ties:
                tie = ties[id(module.weight)]
                plan.skipped.setdefault(
                    first_name[id(module)], f"output layer tied to {tie}: left out as PEFT does; name it to adapt it"
                )
            else:
                candidates[name] = module
    else:
        matched = _matching(model, config.target_modules, "target_modules")
        candidates = {}
        for name, module in matched.items():
            parent_name = name.rpartition(".")[0]
            if isinstance(module, (LoRALayer, ModuleToSave)):
                raise ValueError(f"module '{name}' is already adapted; start from the plain base model")
            if in_attention(name):
                if parent_name not in matched:
                    raise ValueError(
                        f"'{name}' is the out_proj of a MultiheadAttention, which reads its weight directly; "
                        f"target '{parent_name}' instead (it adapts in_proj and out_proj together)"
                    )
            elif lora_class_for(module) is not None:
                candidates[name] = module
            elif not _swept_by_glob(name, config):
                raise ValueError(
                    f"LoRA target '{name}' is a {type(module).__name__}, which LoRA cannot adapt. "
                    f"Adaptable types: {ADAPTABLE}. Adaptable layers here: {_adaptable_names(model)}"
                )
    for module in candidates.values():
        if blocked(module) is None:
            key = first_name[id(module)]
            plan.targets.setdefault(key, module)
            plan.names[key] = all_names[id(module)]
    for name, module in model.named_modules():
        if name and name not in plan.targets and name not in plan.skipped and lora_class_for(module) is not None:
            if not in_attention(name):
                plan.skipped[name] = blocked(module) or "not targeted"
    outer = {first_name[id(model.get_submodule(n))] for n in saved_names}
    plan.to_save = {n: model.get_submodule(n) for n in sorted(outer) if not any(n.startswith(o + ".") for o in outer)}
    if not plan.targets:
        raise ValueError(
            f"LoRAConfig selects no layer to adapt (targets {config.target_modules!r}, excluded "
            f"{config.exclude_modules!r}, trained fully {config.modules_to_save!r}). "
            f"Adaptable layers: {_adaptable_names(model) or 'none'}"
        )
    _check_patterns_match(plan, config)
    _warn_of_two_targets_of_one_tensor(plan)
    return plan


def _warn_of_two_targets_of_one_tensor(plan: TargetPlan) -> None:
    """Two targets sharing one weight (GPT-2's ``lm_head`` and its tied ``wte``) each get their own update.

    That is what was asked for, and merging keeps it right (each module gets its own merged copy,
    the shared base tensor is never written), but the merged model no longer ties them: a library
    that re-ties them on saving (``save_pretrained``) keeps only one of the two. Said at injection.
    """
    owners: dict[int, str] = {}
    for name, module in plan.targets.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if id(weight) in owners:
            log.warning(
                "LoRA targets '%s' and '%s' share one weight tensor (tied, as GPT-2's lm_head and its token embedding "
                "are): each gets its own update, so after a merge they are no longer tied (the outputs stay right; a "
                "save that re-ties them keeps only one). Target only one of them to keep the tie",
                owners[id(weight)],
                name,
            )
        owners[id(weight)] = name


def find_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """The layers ``config`` adapts, by qualified name, without changing anything."""
    return plan_targets(model, config).targets


def log_skipped(plan: TargetPlan) -> None:
    """Say once which adaptable layers the config left alone (an info line)."""
    line = plan.describe_skipped()
    if line:
        log.info(line)


def refuse_oversized(model: nn.Module, config: LoRAConfig, where: str, plan: TargetPlan | None = None) -> None:
    """Refuse, before anything is allocated, a config read from a file that would outgrow the model.

    A real adapter is far smaller than its model; 1M numbers (4 MB) of slack keeps tiny models
    loadable. A crafted rank of millions would otherwise allocate gigabytes first and fail after.

    Args:
        plan: :func:`plan_targets` of this model and config, if made already.

    Raises:
        ValueError: the adapter would hold more numbers than the model itself.
    """
    size = 0
    plan = plan if plan is not None else plan_targets(model, config)
    for name, module in plan.targets.items():
        weight = next(module.parameters())
        outputs = weight.shape[0]
        size += config.for_layer(name).rank * (outputs + weight.numel() // outputs) * getattr(module, "groups", 1)
    limit = max(sum(p.numel() for p in model.parameters()), 1 << 20)
    if size > limit:
        raise ValueError(
            f"{where} would allocate about {size:,} numbers of adapter weights, more than the whole model "
            f"({limit:,}); its rank or targets do not fit this model"
        )
