"""LoRAInjectionCallback: *when* adapters enter a Lightning run, and what is logged and exported.

Injection happens in ``setup()``, for every stage: that hook runs before checkpoint restore,
before DDP wraps the model and before ``configure_optimizers``. Injected any later (say in
``on_fit_start``), the optimizer would hold the frozen weights, DDP would never sync the
adapters, and nothing would train, without any error. This is also why it is a plain
``Callback`` and not ``BaseFinetuning``, whose ``filter_on_optimizer`` compares parameters by
value and so silently drops a second zero-initialised ``lora_B``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_lora.adapter_files import save_adapter
from lightning_lora.config import ALL_LINEAR, LoRAConfig
from lightning_lora.errors import UsageError
from lightning_lora.inject import count_parameters, disable_lora, inject_lora, merge_lora


class LoRAInjectionCallback(pl.Callback):
    """Freeze the base, inject adapters, check the optimizer, log, compare, export.

    Args:
        rank, alpha, dropout, target_modules, exclude_modules, use_dora, use_rslora, init, bias,
            modules_to_save: The :class:`~lightning_lora.LoRAConfig` fields (validated here, so
            a bad value fails before any data is read).
        adapter_dir: Where :meth:`on_fit_end` saves the adapter folder. Default: ``adapter/``
            in the run's log folder.
        merge_on_fit_end: Merge the adapters into the weights after fitting, so later
            ``validate``/``test``/``predict`` calls on the same model run at base-model speed.
        compare_disabled: Also evaluate every validation and test batch with the adapter
            disabled (the base model) and log those numbers with a ``_base`` suffix
            (``test/acc_base``, ``test/wrong_digit_9_base``): adapter on versus off, in one run.
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
        init: Literal["kaiming", "gaussian"] = "kaiming",
        bias: Literal["none", "all", "lora_only"] = "none",
        modules_to_save: list[str] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        adapter_dir: str | None = None,
        merge_on_fit_end: bool = False,
        compare_disabled: bool = True,
    ) -> None:
        super().__init__()
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
        self.adapter_dir = adapter_dir
        self.merge_on_fit_end = merge_on_fit_end
        self.compare_disabled = compare_disabled
        self.base_metrics: dict[str, nn.Module] = {}

    @staticmethod
    def target(pl_module: pl.LightningModule) -> nn.Module:
        """The module adapters go into: ``pl_module.net`` when there is one."""
        return getattr(pl_module, "net", pl_module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            inject_lora(self.target(pl_module), self.config)  # idempotent: setup runs for every stage
        except ValueError as err:  # targets that match nothing, or a non-Linear: the config is wrong
            raise UsageError(str(err)) from err
        if self.compare_disabled and not self.base_metrics:
            if not (hasattr(pl_module, "model_step") and hasattr(pl_module, "new_eval_metrics")):
                raise TypeError(
                    "compare_disabled needs a module with model_step(batch) and new_eval_metrics(), such as "
                    f"LitClassifier; {type(pl_module).__name__} lacks them. Set compare_disabled=False."
                )
            self.base_metrics = {"val": pl_module.new_eval_metrics(), "test": pl_module.new_eval_metrics()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = {id(p): name for name, p in pl_module.named_parameters() if p.requires_grad}
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        if set(trainable) != held:
            missing = sorted(trainable[i] for i in set(trainable) - held)
            raise RuntimeError(
                f"the optimizer does not hold exactly the trainable parameters: {len(held - set(trainable))} "
                f"frozen or foreign tensors in it, trainable ones missing: {missing[:8]}. The optimizer was "
                "built before the adapters existed, e.g. by LightningCLI's top-level 'optimizer:' key. Set "
                "the optimizer as model.optimizer and build it in configure_optimizers from "
                "requires_grad parameters."
            )

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

    def _update_base(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self.compare_disabled:
            return
        with torch.no_grad(), disable_lora(self.target(pl_module)), trainer.precision_plugin.forward_context():
            self.base_metrics[stage].update(*pl_module.model_step(batch))

    def _place_metrics(self, stage: str, pl_module: pl.LightningModule) -> None:
        if self.compare_disabled:
            self.base_metrics[stage].to(pl_module.device)  # once per epoch, not per batch

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place_metrics("val", pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place_metrics("test", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update_base("val", trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update_base("test", trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compare_disabled:
            self.base_metrics["val"].log(pl_module, "val", suffix="_base")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compare_disabled:
            self.base_metrics["test"].log(pl_module, "test", suffix="_base")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _close_spawned_gloo_group(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"lora_config": self.config.to_dict()}


def _close_spawned_gloo_group(trainer: pl.Trainer) -> None:
    """Destroy a ``ddp_spawn`` worker's gloo process group before the worker exits.

    Lightning destroys only NCCL groups at exit; a gloo group left to the interpreter's shutdown
    sometimes aborts the worker ("terminate called without an active exception"). Spawned
    workers exit right after this hook, so nothing needs the group afterwards; ``ddp`` (one
    long-lived process per rank) keeps its group for later ``fit``/``test`` calls.
    """
    spawned = getattr(trainer.strategy, "_start_method", "popen") != "popen"
    if spawned and dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.barrier()
        dist.destroy_process_group()
