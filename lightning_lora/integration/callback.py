"""LoRAInjectionCallback: *when* adapters enter a Lightning run, on any LightningModule.

Adapters must exist before checkpoint restore, before the strategy wraps the model (DDP syncs
only what exists then) and before ``configure_optimizers``; injected later (``on_fit_start``) the
optimizer would hold the frozen weights and nothing would train, without any error. So the
callback injects in ``setup()``, for every stage, or, for a module that builds its network in
``configure_model()`` (Lightning's pattern for large models), right after that hook. It is a plain
``Callback``, not ``BaseFinetuning``, whose ``filter_on_optimizer`` compares parameters by value
and so silently drops a second zero-initialised ``lora_B``.

The adapter-on/adapter-off comparison lives in the module (``NetModule``), which owns the
metrics; this callback knows nothing of the module beyond where its network is.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import RandomSampler

from lightning_lora.core.adapter_folder import save_adapter
from lightning_lora.core.config import ALL_LINEAR, LoRAConfig
from lightning_lora.core.inject import count_parameters, get_lora_config, inject_lora, merge_lora
from lightning_lora.core.safe_io import ADAPTER_FILES, OutputInTheWay, check_folder_kind
from lightning_lora.core.targets import refuse_oversized
from lightning_lora.errors import UsageError
from lightning_lora.integration.checkpoint_mixin import LoRACheckpointMixin, resolve_module_path
from lightning_lora.integration.loop_state import as_batch_end_checkpoint

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
        module_path: str | None = None,
        adapter_dir: str | None = None,
        merge_on_fit_end: bool = False,
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
        self.module_path = module_path
        self.adapter_dir = adapter_dir
        self.merge_on_fit_end = merge_on_fit_end
        self.batches_started = 0  # training batches of this run so far, resumed with the checkpoint
        self.run_seed: int | None = None  # seed_everything's, else drawn once per run; resumed with the checkpoint

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

    def _inject(self, pl_module: pl.LightningModule) -> None:
        target = self.target(pl_module)
        try:
            if get_lora_config(target) is None:
                refuse_oversized(target, self.config, "these LoRA settings")
            inject_lora(target, self.config)  # idempotent: setup runs for every stage
        except ValueError as err:  # targets that match nothing, a layer that cannot be adapted: the config is wrong
            raise UsageError(str(err)) from err

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if sum(isinstance(c, LoRAInjectionCallback) for c in trainer.callbacks) > 1:
            raise UsageError(
                "the Trainer has more than one LoRAInjectionCallback; use one, with module_path set to the part "
                "that holds every layer to adapt and target_modules naming them (e.g. ['encoder.*.q', 'decoder.*.q'])"
            )
        if is_overridden("configure_model", pl_module):
            _inject_after_configure_model(pl_module, self._inject)
        else:
            self._inject(pl_module)
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
            raise RuntimeError(
                "LoRAInjectionCallback: the adapters were not injected before the run started (configure_model "
                "did not run through the callback's wrapper; a Lightning change?). Please report this."
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
        _refuse_inexact_resume(trainer)
        _seed_plain_shuffles(trainer, self._run_seed(trainer))
        _no_checkpoint_before_the_first_step(trainer)
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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        """Seed torch's RNG from (run seed, batch number, rank): dropout masks no longer depend on history.

        Whatever drew random numbers before (validation, the DataLoader's own seed draw, a resume),
        batch ``k`` of a run sees the same masks, so a resumed run repeats an uninterrupted one.
        Only the generators the step can draw from are seeded, the CPU's and the module's device's:
        ``torch.manual_seed`` also queues a seeding of every backend not yet initialised, capturing
        a stack trace each time (0.2-0.7 ms a step, a quarter of a small network's step on the CPU).
        """
        run_seed = self._run_seed(trainer)
        seed = ((run_seed * 1_000_003 + self.batches_started) * 8_191 + trainer.global_rank) % 2**63
        torch.default_generator.manual_seed(seed)
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
        elif device.type != "cpu":
            torch.manual_seed(seed)
        self.batches_started += 1

    def _run_seed(self, trainer: pl.Trainer) -> int:
        """``seed_everything``'s seed; without one, a random seed drawn once (rank zero's, for every rank).

        Unseeded runs then differ from each other as users expect, and a resumed run continues with
        the seed its checkpoint recorded.
        """
        if self.run_seed is None:
            seed = os.environ.get("PL_GLOBAL_SEED")
            drawn = int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little")
            self.run_seed = int(trainer.strategy.broadcast(drawn, src=0))
        return self.run_seed

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
        return self._generate_state_key(module_path=self.module_path)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        as_batch_end_checkpoint(trainer, checkpoint)  # an epoch-end checkpoint then resumes exactly too

    def state_dict(self) -> dict[str, Any]:
        return {
            "lora_config": self.config.to_dict(),
            "batches_started": self.batches_started,
            "run_seed": self.run_seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_started = int(state_dict.get("batches_started", 0))
        seed = state_dict.get("run_seed")
        self.run_seed = int(seed) if isinstance(seed, int) else None


def _no_checkpoint_before_the_first_step(trainer: pl.Trainer) -> None:
    """Tell each ModelCheckpoint that the step a run resumes at is already saved.

    Lightning forgets that on resume (its marker starts at 0), so ``every_n_train_steps`` saves
    again after the resumed run's first batch, before any step: with gradient accumulation
    that checkpoint falls between the batches of one step and cannot resume exactly. Lightning
    has no public setting for this; ``tests/test_adversarial_runs.py`` fails if the marker goes.
    """
    for callback in trainer.checkpoint_callbacks:
        if hasattr(callback, "_last_global_step_saved"):
            callback._last_global_step_saved = trainer.global_step


def _seed_plain_shuffles(trainer: pl.Trainer, run_seed: int) -> None:
    """Give a plain ``DataLoader(shuffle=True)`` an order that depends only on (run seed, epoch).

    Its ``RandomSampler`` draws each epoch's order from torch's global random state, which no
    checkpoint restores, so a resumed run would see other batches. Lightning calls ``set_epoch``
    on every training sampler that has one before each epoch (also the first after a resume),
    so the sampler gets a generator reseeded there. The order stays uniformly random; under DDP
    Lightning's own DistributedSampler does the same.
    """
    loaders = trainer.train_dataloader
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        if type(sampler) is RandomSampler and sampler.generator is None and not hasattr(sampler, "set_epoch"):
            sampler.generator = torch.Generator()

            def set_epoch(epoch: int, generator: torch.Generator = sampler.generator) -> None:
                generator.manual_seed((run_seed * 1_000_003 + epoch) % 2**63)

            sampler.set_epoch = set_epoch
            set_epoch(trainer.current_epoch)


def _refuse_inexact_resume(trainer: pl.Trainer) -> None:
    """Refuse a resume that could not repeat the interrupted run, and settings that write such checkpoints.

    Lightning restarts a mid-epoch resume from the epoch's first batch when the DataLoader cannot
    continue where it stopped (it only warns), and a checkpoint written between the batches of
    one accumulated step lacks that step's partial gradient. Either way the resumed run would
    train on something else than the interrupted one, silently.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    done = progress.current.processed  # a checkpoint is written before `completed` counts its batch
    loader = trainer.train_dataloader
    resumable = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
    accumulate = trainer.accumulate_grad_batches
    if done > 0 and not progress.is_last_batch and not resumable:
        raise UsageError(
            f"resuming {done} batches into an epoch, but the training DataLoader ({type(loader).__name__}) cannot "
            "continue where the run stopped, so training would not repeat the interrupted run. Resume from a "
            "checkpoint written at an epoch end, or give the DataLoader state_dict()/load_state_dict() (as "
            "lightning_lora.demo.mnist_datamodule.ResumableDataLoader does)."
        )
    if done % accumulate and not progress.is_last_batch:
        raise UsageError(
            f"the checkpoint was written after batch {done} of its epoch, in the middle of a step that accumulates "
            f"{accumulate} batches: the gradient of those batches is not in it, so the run cannot continue exactly. "
            "Resume from another checkpoint of the run (every_n_train_steps ones are written between steps)."
        )
    validation_every = trainer.val_check_batch
    within_epoch = isinstance(validation_every, int) and validation_every < trainer.num_training_batches
    if within_epoch and validation_every % accumulate and trainer.enable_validation and trainer.checkpoint_callbacks:
        raise UsageError(
            f"validation every {validation_every} batches with accumulate_grad_batches {accumulate}: checkpoints "
            "written at validation would fall in the middle of an accumulated step and could not be resumed "
            f"exactly. Make val_check_interval a multiple of {accumulate} batches."
        )


class _ConfigureModelThenInject:
    """Stands in for a module's ``configure_model`` for one call: the module's own, then the injection.

    Lightning has no callback hook between ``configure_model`` and the strategy's setup (which
    wraps the model and calls ``configure_optimizers``), so the hook is replaced on the instance
    (Lightning calls it through the instance) until it has run once; the module is then as it
    was (picklable, copyable). The callback's start-of-run check reports it if Lightning ever
    stops calling the hook this way.
    """

    def __init__(self, module: pl.LightningModule, inject: Any) -> None:
        self.module, self.inject = module, inject
        self.__wrapped__ = type(module).configure_model  # Lightning's is_overridden looks through this

    def __call__(self) -> None:
        module = self.module
        try:
            type(module).configure_model(module)
            self.inject(module)
        finally:
            module.__dict__.pop("configure_model", None)


def _inject_after_configure_model(pl_module: pl.LightningModule, inject: Any) -> None:
    """Run ``inject`` right after the module's ``configure_model()`` (set up again for every stage)."""
    if not isinstance(pl_module.__dict__.get("configure_model"), _ConfigureModelThenInject):
        pl_module.configure_model = _ConfigureModelThenInject(pl_module, inject)


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
