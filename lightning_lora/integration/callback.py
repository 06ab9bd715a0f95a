"""LoRAInjectionCallback: *when* adapters enter a Lightning run, on any LightningModule.

Adapters must exist before checkpoint restore, before the strategy wraps the model (DDP syncs
only what exists then) and before ``configure_optimizers``; injected later (``on_fit_start``) the
optimizer would hold the frozen weights and nothing would train, without any error. So the
callback injects in ``setup()``, for every stage. A module that builds its network in
``configure_model()`` (Lightning's pattern for large models) inherits
:class:`~lightning_lora.integration.checkpoint_mixin.LoRACheckpointMixin` and calls
``super().configure_model()`` at the end of its own: the mixin's hook asks this callback to inject
right there, before the strategy wraps the model. It is a plain ``Callback``, not
``BaseFinetuning``, whose ``filter_on_optimizer`` compares parameters by value and so silently
drops a second zero-initialised ``lora_B``.

The adapter-on/adapter-off comparison lives in the module (``NetModule``), which owns the
metrics; exact resume is ``ExactResume``'s; this callback knows nothing of the module beyond where
its network is.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_lora.core.active_adapters import lora_adapter_names, set_active_adapters
from lightning_lora.core.adapter_folder import load_adapter, save_adapter
from lightning_lora.core.adapter_tensors import count_parameters
from lightning_lora.core.config import ALL_LINEAR, InitName, LoRAConfig
from lightning_lora.core.diagnostics import adapter_stats
from lightning_lora.core.inject import get_lora_config, inject_checked, inject_lora, merge_lora
from lightning_lora.core.layers import DEFAULT_ADAPTER
from lightning_lora.core.model_state import check_adapter_name
from lightning_lora.core.safe_io import ADAPTER_FILES, OutputInTheWay, check_folder_kind
from lightning_lora.errors import UsageError
from lightning_lora.integration.adapter_restore import refuse_other_lora_settings, resolve_module_path
from lightning_lora.integration.checkpoint_mixin import LoRACheckpointMixin

_TOLD: set[type] = set()  # module classes already told how to get adapter-only checkpoints


class LoRAInjectionCallback(pl.Callback):
    """Freeze the base, inject adapters, check the optimizer, log counts, export the adapter.

    Args:
        rank, alpha, dropout, target_modules, exclude_modules, use_dora, use_rslora, init, bias,
            modules_to_save, rank_pattern, alpha_pattern: The :class:`~lightning_lora.LoRAConfig`
            fields (validated here, so a bad value fails before any data is read).
        module_path: Dotted attribute path of the network to adapt (``"net"``,
            ``"model.backbone"``). Default: ``pl_module.net`` when it exists, else the module.
        adapter_dir: Where :meth:`on_fit_end` saves the adapter folder (PEFT's format). Default:
            ``adapter/`` in the run's log folder.
        merge_on_fit_end: Merge the adapters into the weights after fitting, so later
            ``validate``/``test``/``predict`` calls on the same model run at base-model speed.
        stats_every_n_steps: Every this many optimizer steps (0: never), log each adapted layer's
            :func:`~lightning_lora.core.diagnostics.adapter_stats` for the adapter it trains:
            ``adapter_stats/<adapter>/<layer>/delta_norm_ratio`` and ``.../effective_rank`` as scalars,
            ``.../singular_values`` as a TensorBoard histogram (frozen adapters do not change, so are not logged).
        adapter_name: The name of the adapter this callback injects and trains. Other adapters of the
            network (from ``load_adapters``) stay frozen and inactive while it trains.
        load_adapters: Adapter name -> adapter folder, each loaded into the network (frozen, inactive)
            before this callback's adapter is injected: a "digit 4" adapter trained beside a finished
            "digit 9" one. Checkpoints hold them all; the adapter folder at fit end holds them all.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        target_modules: list[str] | str = ALL_LINEAR,
        exclude_modules: list[str] | None = None,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: InitName = "kaiming",
        bias: Literal["none", "all", "lora_only"] = "none",
        modules_to_save: list[str] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        module_path: str | None = None,
        adapter_dir: str | None = None,
        merge_on_fit_end: bool = False,
        stats_every_n_steps: int = 0,
        adapter_name: str = DEFAULT_ADAPTER,
        load_adapters: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(stats_every_n_steps, bool) or not isinstance(stats_every_n_steps, int) or stats_every_n_steps < 0:
            raise ValueError(f"stats_every_n_steps must be an integer >= 0 (0: never), got {stats_every_n_steps!r}")
        self.stats_every_n_steps = stats_every_n_steps
        self._stats_logged_at = -1
        self.config = LoRAConfig(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=exclude_modules or [],
            use_dora=use_dora,
            use_rslora=use_rslora,
            init=init,
            bias=bias,
            modules_to_save=modules_to_save or [],
            rank_pattern=rank_pattern or {},
            alpha_pattern=alpha_pattern or {},
        )
        self.module_path = module_path
        self.adapter_dir = adapter_dir
        self.merge_on_fit_end = merge_on_fit_end
        self.adapter_name = check_adapter_name(adapter_name)
        if load_adapters is not None and not (
            isinstance(load_adapters, dict) and all(isinstance(v, (str, Path)) for v in load_adapters.values())
        ):
            raise ValueError(f"load_adapters must map adapter names to adapter folders, got {load_adapters!r}")
        self.load_adapters = {check_adapter_name(k): str(v) for k, v in (load_adapters or {}).items()}
        if self.adapter_name in self.load_adapters:
            raise ValueError(
                f"load_adapters names {self.adapter_name!r}, the adapter this callback trains; give the new adapter "
                "another adapter_name"
            )

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network the adapters go into (it must be built by now)."""
        path, module = resolve_module_path(pl_module, self.module_path)
        if module is None:
            raise UsageError(
                f"'{path}' of {type(pl_module).__name__} is still None when adapters must be injected; build the "
                "network in __init__ or configure_model()"
            )
        if path and not any(True for _ in module.children()):  # a bare layer: adapt it from its parent
            raise UsageError(
                f"'{path}' of {type(pl_module).__name__} is a single {type(module).__name__}, not a network of "
                f"layers; set module_path to its parent (module_path='{path.rpartition('.')[0]}', '' meaning the "
                f"LightningModule itself) and target_modules=['{path.rpartition('.')[2]}']"
            )
        return module

    def inject_into(self, pl_module: pl.LightningModule) -> None:
        """Adapt ``pl_module``'s network now (idempotent: setup runs for every stage)."""
        target = self.target(pl_module)
        try:
            for name, folder in self.load_adapters.items():
                if name not in lora_adapter_names(target):
                    load_adapter(target, folder, adapter_name=name)
            names = lora_adapter_names(target)
            if not names:
                inject_checked(target, self.config, "these LoRA settings", adapter_name=self.adapter_name)
            elif self.adapter_name not in names and not set(names) <= set(self.load_adapters):
                foreign = [n for n in names if n not in self.load_adapters]
                raise ValueError(
                    f"the network already holds adapters {foreign} that this callback did not make (it makes "
                    f"{self.adapter_name!r}); drop the callback, or name them in load_adapters"
                )
            else:  # the same settings again (a no-op), a clear refusal, or a new adapter beside loaded ones
                inject_lora(target, self.config, adapter_name=self.adapter_name)
            set_active_adapters(target, self.adapter_name)
        except (FileNotFoundError, ValueError) as err:  # the config or a folder is wrong
            raise UsageError(str(err)) from err

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if sum(isinstance(c, LoRAInjectionCallback) for c in trainer.callbacks) > 1:
            raise UsageError(
                "the Trainer has more than one LoRAInjectionCallback; use one, with module_path set to the part "
                "that holds every layer to adapt and target_modules naming them (e.g. ['encoder.*.q', 'decoder.*.q'])"
            )
        path, module = resolve_module_path(pl_module, self.module_path)
        if module is not None:
            self.inject_into(pl_module)
        elif not isinstance(pl_module, LoRACheckpointMixin):
            raise UsageError(
                f"'{path or type(pl_module).__name__}' of {type(pl_module).__name__} is not built yet when the "
                "adapters must be injected. Build the network in __init__, or build it in configure_model() and "
                "inherit lightning_lora.LoRACheckpointMixin (class MyModule(LoRACheckpointMixin, LightningModule)), "
                "calling super().configure_model() at the end of yours: the adapters are injected there"
            )
        if stage == "fit" and not isinstance(pl_module, LoRACheckpointMixin) and type(pl_module) not in _TOLD:
            _TOLD.add(type(pl_module))  # once per module class and process
            rank_zero_info(
                f"LoRA: checkpoints of {type(pl_module).__name__} hold the whole model, and its "
                "load_from_checkpoint cannot rebuild the adapters (Trainer.fit/test with ckpt_path can); inherit "
                "lightning_lora.LoRACheckpointMixin (class MyModule(LoRACheckpointMixin, LightningModule)) for "
                "adapter-only checkpoints that load_from_checkpoint restores."
            )

    def _check_injected(self, pl_module: pl.LightningModule) -> None:
        if get_lora_config(self.target(pl_module)) is None:
            raise UsageError(
                "LoRAInjectionCallback: the adapters were not injected before the run started. If "
                f"{type(pl_module).__name__}.configure_model() builds the network, end it with "
                "super().configure_model() (LoRACheckpointMixin's hook injects them there)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_injected(pl_module)
        _check_optimizer(trainer, pl_module)
        if self.adapter_dir is not None and trainer.is_global_zero:
            try:  # at the start, not after the whole run: adapter_dir must be new or an adapter folder
                check_folder_kind(Path(self.adapter_dir), ADAPTER_FILES, "adapter")
            except OutputInTheWay as err:
                raise UsageError(f"adapter_dir: {err}") from err

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_injected(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_injected(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = count_parameters(pl_module)
        rank_zero_info(f"LoRA {self.config}: {count}")
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "params/trainable": count.trainable,
                    "params/total": count.total,
                    "params/trainable_pct": count.percent,
                },
                step=trainer.global_step,
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step, every = trainer.global_step, self.stats_every_n_steps
        if not every or not step or step % every or step == self._stats_logged_at or not trainer.is_global_zero:
            return
        self._stats_logged_at = step  # once per optimizer step, also under gradient accumulation
        stats = adapter_stats(self.target(pl_module))
        for logger in trainer.loggers:
            scalars = {}
            for layer in stats:
                if layer.adapter != self.adapter_name:
                    continue
                tag = f"adapter_stats/{layer.adapter}/{layer.name}"
                scalars[f"{tag}/delta_norm_ratio"] = layer.delta_norm_ratio
                scalars[f"{tag}/effective_rank"] = layer.effective_rank
                if hasattr(logger.experiment, "add_histogram") and layer.singular_values:
                    logger.experiment.add_histogram(f"{tag}/singular_values", torch.tensor(layer.singular_values), step)
            logger.log_metrics(scalars, step=step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.target(pl_module)
        path = self.adapter_path(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero and not trainer.fast_dev_run:
            save_adapter(net, path)
            rank_zero_info(f"LoRA adapter saved to {path}")
        if self.merge_on_fit_end:
            merge_lora(net)

    def adapter_path(self, trainer: pl.Trainer) -> Path:
        if self.adapter_dir is not None:
            return Path(self.adapter_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapter"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _close_spawned_gloo_group()

    @property
    def state_key(self) -> str:
        """Keyed by the adapted module, so a second callback reaches :meth:`setup`'s clear refusal."""
        return f"{type(self).__qualname__}[module_path={self.module_path!r}]"

    def state_dict(self) -> dict[str, Any]:
        return {"lora_config": self.config.to_dict(), "adapter_name": self.adapter_name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a run trained with other LoRA settings, naming each field that differs."""
        recorded = state_dict.get("lora_config")
        if isinstance(recorded, dict):
            refuse_other_lora_settings(LoRAConfig.from_dict(recorded), self.config)
        name = state_dict.get("adapter_name", DEFAULT_ADAPTER)
        if name != self.adapter_name:
            raise UsageError(
                f"the checkpoint trained adapter {name!r}, this run trains {self.adapter_name!r}: resume with "
                f"--lora.adapter_name {name}, or start a new run"
            )


def _check_optimizer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The optimizer must hold exactly the trainable parameters; say which way it is wrong, and the fix."""
    if not trainer.optimizers:  # configure_optimizers returned None: Lightning says so itself; nothing trains
        return
    names = {id(p): n for n, p in pl_module.named_parameters()}
    trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
    held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    frozen_held = sorted(names.get(i, "<not a parameter of the module>") for i in held - trainable)
    missing = sorted(names[i] for i in trainable - held)
    problems = []
    if frozen_held:
        problems.append(
            f"it holds {len(frozen_held)} frozen parameter(s) ({', '.join(frozen_held[:4])}), so it was built from "
            "all parameters (self.parameters()); build it from the trainable ones only: "
            "torch.optim.AdamW(p for p in self.parameters() if p.requires_grad)"
        )
    if missing:
        problems.append(
            f"it lacks {len(missing)} trainable parameter(s) ({', '.join(missing[:4])}), so it was built before "
            "the adapters existed (in __init__, or by LightningCLI's top-level 'optimizer:' key); build it in "
            "configure_optimizers (for LitClassifier: model.optimizer in the config)"
        )
    if problems:
        raise UsageError("the optimizer does not hold exactly the trainable parameters: " + "; and ".join(problems))


def _close_spawned_gloo_group() -> None:
    """Destroy a ``ddp_spawn`` worker's gloo process group before the worker exits.

    Lightning destroys only NCCL groups at exit; a gloo group left to the interpreter's shutdown
    sometimes aborts a spawned worker ("terminate called without an active exception"). A
    spawned worker (it has a multiprocessing parent) exits right after this hook; ``ddp``'s
    processes (started as scripts) keep their group for later ``fit``/``test`` calls.
    """
    spawned = multiprocessing.parent_process() is not None
    if spawned and dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["LoRAInjectionCallback"]
