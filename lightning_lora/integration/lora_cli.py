"""LightningCLI for ``fit``/``validate``/``test``/``predict``, with LoRA settings as a group of their own.

``--lora.rank 4 --lora.target_modules '[linear1]'`` (or a ``lora:`` section in a config) adds a
:class:`~lightning_lora.integration.callback.LoRAInjectionCallback` with those settings; ``fit --help``
lists them. Every run gets ``ExactResume`` (``--new_data_order`` is its option) and ``RunRecord``;
checkpoints are written atomically and read safely (:class:`SafeCheckpointIO`); a parse or type
error is one line naming the option, the value and what it accepts.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_lora.core.config import CALLBACK_ONLY_OPTIONS, LoRAConfig
from lightning_lora.core.safe_io import sweep_stale_temporaries
from lightning_lora.errors import UsageError, root_cause
from lightning_lora.integration.callback import LoRAInjectionCallback
from lightning_lora.integration.checkpoint_reader import describe_resolution, resolve_checkpoint
from lightning_lora.integration.evaluation_log import evaluation_step, logger_beside_its_fit, results_table
from lightning_lora.integration.exact_resume import ExactResume
from lightning_lora.integration.failed_run_cleanup import discard_failed_run, entries_held, new_run_folder
from lightning_lora.integration.line_progress import LineProgress
from lightning_lora.integration.run_record import RunRecord
from lightning_lora.integration.safe_checkpoint_io import SafeCheckpointIO

LORA_GROUP = "lora"
NEW_DATA_ORDER = "new_data_order"
EVALUATIONS = ("validate", "test")
_RUN: dict[str, Any] = {}  # the trainer of the command running now, for an honest SIGTERM message


def sigterm_report() -> str:
    """What a SIGTERM left behind, truthfully: whether a checkpoint holds the step the run stopped at."""
    trainer, started = _RUN.get("trainer"), _RUN.get("started", float("inf"))
    stopped = trainer.global_step if trainer is not None else None
    paths = [
        Path(p)
        for cb in (trainer.checkpoint_callbacks if trainer is not None else [])
        for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""))
        if p
    ]
    written = [p for p in paths if p.is_file() and p.stat().st_mtime >= started]
    reasons = ["the run's checkpoint callback does not save at a signal"]
    if trainer is not None and trainer.accumulate_grad_batches > 1:
        reasons.insert(0, f"it came in the middle of an optimizer step of {trainer.accumulate_grad_batches} "
                          "accumulated batches, whose first batches' gradients no checkpoint holds")  # fmt: skip
    why = "; or ".join(reasons)
    if not written:
        earlier = trainer.ckpt_path if trainer is not None else None
        if earlier:
            return (
                f"stopped by SIGTERM at step {stopped} before this run saved a checkpoint ({why}); the checkpoint it "
                f"resumed from is unchanged: resume again with --ckpt_path {earlier}"
            )
        return f"stopped by SIGTERM before any checkpoint of this run could be saved ({why}); nothing to resume from"
    newest = max(written, key=lambda p: p.stat().st_mtime)
    try:
        step = torch.load(newest, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # a checkpoint that cannot be read back is reported without its step
        step = None
    if step is not None and step == stopped:
        return (
            f"stopped by SIGTERM at step {stopped}; a checkpoint of that step was saved to {newest}: "
            f"resume with --ckpt_path {newest}"
        )
    return (
        f"stopped by SIGTERM at step {stopped}; no checkpoint was written at the signal ({why}). "
        f"The newest checkpoint of this run is {newest}, from step {step}: resuming with --ckpt_path {newest} "
        "repeats the steps after it"
    )


def short_parse_error(message: str) -> str:
    """jsonargparse's nested union dump, cut to one line: the option, what it accepts, the value given."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    option = ""
    for key in keys:
        option = key if not option or key.startswith(option + ".") else f"{option}.{key}"
    nested = re.search(r"NestedArg\(key='([^']*)', val='([^']*)'\)", message)
    if nested and keys:  # a --group.sub.option given on the command line: name it as the user typed it
        option = f"{keys[0]}.{nested.group(1)}"
    value = nested.group(2) if nested else _given_value(message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    if unknown and classes:
        short = classes[-1].rsplit(".", 1)[-1]
        group = (option.rsplit(".", 1)[0] if nested else option).replace(".init_args", "")
        return f"--{group}.{unknown.group(1)}: {short} has no option '{unknown.group(1)}'; see --{group}.help {short}"
    missing = re.search(r"module '([^']+)' has no attribute '([^']+)'", message)
    if missing and classes:
        return f"--{option}.class_path: {classes[-1]} does not exist ({missing.group(1)} has no {missing.group(2)})"
    ambiguous = re.search(r"Multiple subclasses with name (\w+)\. [^:]*: (.+?)\.?$", message, re.MULTILINE)
    if ambiguous:
        return (
            f"--{option}: the short name {ambiguous.group(1)!r} could mean {ambiguous.group(2)}; "
            "give the full class path, e.g. --model.net lightning_lora.demo.nets.MLP"
        )
    no_module = re.search(r"No module named '([^']+)'", message)
    if no_module and classes:
        return f"--{option}: cannot import {classes[-1]!r} (no module named {no_module.group(1)!r}); check the path"
    not_a_path = re.search(r"Expected a dot import path string: ?(\S*)", message)
    kinds = _accepted_kinds(message)
    if option and (value == "" or (not_a_path and not not_a_path.group(1))):
        return f"--{option}: needs a value (an empty string was given)"
    if kinds and value is not None:
        return f"--{option}: expected {' or '.join(kinds)}, got {value!r}"
    if not_a_path:
        where = f"--{option}: " if option else ""  # (a --*.help CLASS names no option in the message)
        return (
            f"{where}{not_a_path.group(1)!r} is not a class; give a dotted import path "
            "(e.g. lightning_lora.demo.nets.MLP) or the short name of a class lightning-lora knows"
        )
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not option and message.startswith("Problems parsing config"):
        return " ".join(lines)  # a YAML error: its lines name the file, the line and the column
    reasons = [
        line[2:]
        for line in lines
        if line.startswith("- ") and not re.match(r"- (Expected a <class 'NoneType'>|Problem)", line)
    ]
    last = reasons[-1] if reasons and lines and lines[-1].startswith("Given value") else (lines[-1] if lines else "")
    return f"--{option}: {last}" if option and lines else (lines[0] if lines else message)


def _given_value(message: str) -> str | None:
    got = re.findall(r"Got value: (.+)", message)
    if got:
        return got[-1].strip()
    given = re.findall(r"Given value: (.+)", message)
    return given[-1].split(". Got value:")[0].strip() if given else None


def _accepted_kinds(message: str) -> list[str]:
    """What the option accepts, from jsonargparse's 'Expected a ...' lines (None alternatives left out)."""
    kinds: list[str] = []
    literals: list[str] = []
    for expected in re.findall(r"Expected a (<class '[\w.]+'>|typing\.Literal\[[^\]]*\])", message):
        if expected == "<class 'NoneType'>":
            continue
        if expected.startswith("typing.Literal"):
            literals += [v for v in expected[len("typing.Literal[") : -1].split(", ") if v not in literals]
            continue
        name = expected[len("<class '") : -2].rsplit(".", 1)[-1]
        kind = ("an " if name[0] in "aeiou" else "a ") + name
        if kind not in kinds:
            kinds.append(kind)
    return kinds + (["one of " + ", ".join(literals)] if literals else [])


class ShortErrorParser(LightningArgumentParser):
    """Report a bad option in one line (exit code 2), not a usage dump and a nested union error."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if not self.exit_on_error:  # jsonargparse probing an alternative: it catches this one itself
            return super().error(message, ex)
        short = short_parse_error(message)
        raise UsageError(short if "see --" in short else short + "; see --help")


def _lora_help() -> str:
    fields = ", ".join(f"--{LORA_GROUP}.{name}" for name in LoRAConfig.field_names())
    return (
        "LoRA fine-tuning: adds a LoRAInjectionCallback with these settings (or a 'lora:' section in a config). "
        f"Options: {fields}, {', '.join(f'--{LORA_GROUP}.{name}' for name in CALLBACK_ONLY_OPTIONS)}. "
        f"Details: --{LORA_GROUP}.help LoRAInjectionCallback"
    )


class LoRACLI(LightningCLI):
    """LightningCLI with the ``lora`` group, exact and checked resume, safe checkpoints and short errors.

    Args:
        command: The command line to parse, without ``--ckpt_path`` (``sys.argv`` keeps the whole
            command: Lightning's DDP launcher starts the other processes with it).
        ckpt_path: ``--ckpt_path`` as the user gave it (a ``.ckpt`` file, a run or version folder,
            or ``last``), taken off the command line before LightningCLI parses it. It reaches the
            Trainer through its public ``ckpt_path`` property, never through LightningCLI's own
            handling, which would read the checkpoint's hyper-parameters and let them override the
            config (a stored ``base_checkpoint`` beating the one given; a stored class path switching
            the model class). The config alone decides the model; the checkpoint is read once, by
            Lightning's restore (through :class:`SafeCheckpointIO`), and its adapters are checked
            against the config there.
        args, kwargs: LightningCLI's.
    """

    def __init__(self, *args: Any, command: list[str], ckpt_path: str | None = None, **kwargs: Any) -> None:
        self.command = command
        self.requested_ckpt_path = ckpt_path
        self.resolved_ckpt_path: Path | None = None
        _RUN.clear()  # what an earlier command of this process ran is not this one's
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse :attr:`command` (``--ckpt_path`` taken off), not ``sys.argv``."""
        self.config = parser.parse_args(self.command)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(f"--{LORA_GROUP}", type=LoRAInjectionCallback | None, default=None, help=_lora_help())
        parser.add_argument(
            f"--{NEW_DATA_ORDER}",
            type=bool,
            default=False,
            help="With --ckpt_path: accept changed data-order settings (batch size, data seed, digits, replay "
            "share, accumulate_grad_batches, seed); the data order restarts: the batches left in the current epoch are "
            "the new order's first.",
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps the constructor's own error
            raise UsageError(str(root_cause(err))) from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        interval = config["trainer"].get("val_check_interval")
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
            raise UsageError(
                f"trainer.val_check_interval must be > 0 (a number of batches, or a fraction of an epoch), got "
                f"{interval!r}; to switch validation off, set --trainer.limit_val_batches 0"
            )
        callbacks = [ExactResume(new_data_order=bool(config.get(NEW_DATA_ORDER)))]  # first: it notes each hook's place
        callbacks += list(config["trainer"].get("callbacks") or [])
        if config.get(LORA_GROUP) is not None:
            callbacks.append(config[LORA_GROUP])
        if not any(isinstance(c, RunRecord) for c in callbacks):
            callbacks.append(RunRecord())
        bar_wanted = config["trainer"].get("enable_progress_bar") is not False
        if bar_wanted and not sys.stderr.isatty() and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(LineProgress())  # a redrawn bar shows nothing in a log file until the epoch ends
        plugins = config["trainer"].get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        logger = config["trainer"].get("logger")
        if self.requested_ckpt_path is not None and self.subcommand in EVALUATIONS and isinstance(logger, Logger):
            self.resolved_ckpt_path = self._resolve_ckpt_path(self.requested_ckpt_path, logger)
            kwargs = {**self._log_beside_the_fit(logger), **kwargs}  # so the logger is known before the trainer
        trainer = super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)
        new_folder = new_run_folder(trainer)
        _RUN.update(trainer=trainer, started=time.time(), new_folder=new_folder, held=entries_held(trainer, new_folder))
        _sweep_earlier_runs(trainer)
        if self.requested_ckpt_path is not None:
            if self.resolved_ckpt_path is None:
                self.resolved_ckpt_path = self._resolve_ckpt_path(self.requested_ckpt_path, trainer.logger)
            trainer.ckpt_path = str(self.resolved_ckpt_path)
        return trainer

    def _log_beside_the_fit(self, logger: Any) -> dict[str, Any]:
        """For ``validate``/``test`` of a fit's checkpoint: log into that fit's folder (:func:`logger_beside_its_fit`),
        the config saved as ``<command>_config.yaml`` (the fit's ``config.yaml`` stays)."""
        settings = getattr(self.config[self.subcommand]["trainer"]["logger"], "init_args", None)
        beside = logger_beside_its_fit(logger, self.resolved_ckpt_path, settings.as_dict()) if settings else None
        if beside is None:
            return {}
        self.save_config_kwargs = {
            **self.save_config_kwargs,
            "config_filename": f"{self.subcommand}_config.yaml",
            "overwrite": True,  # the latest evaluation's settings; the numbers of earlier ones stay in the events
        }
        return {"logger": beside}

    def _take_over_the_table(self) -> None:
        """Print :func:`results_table` after the run instead of Lightning's table (``--verbose`` still decides)."""
        config = self.config_init[self.subcommand]
        self._verbose = bool(config.get("verbose", True))
        config["verbose"] = False

    def _print_results(self) -> None:
        trainer = self.trainer
        if getattr(self, "_verbose", False) and trainer.is_global_zero and trainer.callback_metrics:
            where = f" of {trainer.ckpt_path} (step {evaluation_step(trainer)})" if trainer.ckpt_path else ""
            print(results_table(trainer.callback_metrics, f"{self.subcommand}{where}"), flush=True)

    before_validate = before_test = _take_over_the_table
    after_validate = after_test = _print_results

    def _resolve_ckpt_path(self, requested: str, logger: Any) -> Path:
        """A checkpoint file from what ``--ckpt_path`` names (no file is read here: Lightning's restore reads it)."""
        if requested in ("best", "hpc", "registry"):
            raise UsageError(
                f"--ckpt_path {requested} names a checkpoint of an earlier fit in the same Python process, which a "
                "command line run has not; give a .ckpt file or a run folder (runs/<name> means its newest checkpoint)"
            )
        reference = _latest_run(logger) if requested == "last" else requested
        try:
            resolved = resolve_checkpoint(reference, "ckpt_path")
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
        note = describe_resolution(reference, resolved)
        if note:
            rank_zero_info(f"--ckpt_path {note}")
        return resolved

    def before_fit(self) -> None:
        """Refuse to write into a checkpoint folder that holds another run's checkpoints, or over its adapter.

        With a logger every run gets its own version folder; with ``--trainer.logger false`` or a
        fixed ``dirpath`` two runs would overwrite each other's ``last.ckpt`` (Lightning only
        warns) and ``adapter/``. Resuming a run in its own folder is the one exception.
        """
        trainer = self.trainer
        resumed_from = self.resolved_ckpt_path.resolve().parent if self.resolved_ckpt_path else None
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath is None and trainer.loggers:
                continue  # Lightning puts it in the logger's new version folder
            folder = Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"
            taken = folder.is_dir() and any(folder.glob("*.ckpt"))
            if taken and folder.resolve() != resumed_from:
                raise UsageError(
                    f"the checkpoint folder {folder} already holds another run's checkpoints, and this run would "
                    "overwrite them (it has no version folder of its own). Keep the logger (each run then writes "
                    "to runs/<name>/version_N), give a new --trainer.default_root_dir, or resume that run with "
                    "--ckpt_path"
                )
        _refuse_another_runs_adapter(trainer, resuming=resumed_from is not None)


def _refuse_another_runs_adapter(trainer: pl.Trainer, resuming: bool) -> None:
    """Without a logger there is no version folder: a new run's adapter would replace the last run's at fit end."""
    for callback in [] if trainer.loggers or resuming else trainer.callbacks:
        path = callback.adapter_path(trainer) if isinstance(callback, LoRAInjectionCallback) else None
        if path is not None and callback.adapter_dir is None and path.exists():
            raise UsageError(
                f"{path} holds another run's adapter, and this run (no logger, so no version folder of its own) "
                "would replace it at fit end. Keep the logger (each run then writes runs/<name>/version_N/adapter), "
                "or set --lora.adapter_dir to a new folder"
            )


def _latest_run(logger: Any) -> str:
    """The run folder of this config's name (``runs/<name>``), for ``--ckpt_path last``."""
    save_dir, name = getattr(logger, "save_dir", None), getattr(logger, "name", None)
    if not save_dir or not name:
        raise UsageError("--ckpt_path last needs the run folders a logger makes; pass the checkpoint file instead")
    folder = Path(save_dir) / name
    if not folder.is_dir():
        raise UsageError(f"--ckpt_path last: there is no earlier run of this config in {folder} to resume")
    return str(folder)


def run_folder() -> Path | None:
    """The version folder the command running now logs into, if it has one."""
    logger = _RUN["trainer"].logger if _RUN.get("trainer") is not None else None
    return Path(logger.log_dir) if isinstance(logger, TensorBoardLogger) else None


def discard_empty_run() -> Path | None:
    """After a failed command: remove what it left in run folders that holds nothing of value
    (:func:`~lightning_lora.integration.failed_run_cleanup.discard_failed_run`). Returns the folder removed, if any."""
    trainer = _RUN.get("trainer")
    if trainer is None:
        return None
    starts = [cb.step_at_start for cb in trainer.callbacks if isinstance(cb, ExactResume)]
    began = next((step for step in starts if step is not None), None) if starts else 0  # None: before training
    return discard_failed_run(trainer, _RUN.get("new_folder"), _RUN.get("held"), began)


def _sweep_earlier_runs(trainer: pl.Trainer) -> None:
    """Remove what killed runs of this name left half-written in their checkpoint folders (dead writers only)."""
    logger = trainer.logger
    save_dir, name = getattr(logger, "save_dir", None), getattr(logger, "name", None)
    if trainer.is_global_zero and save_dir and name and (Path(save_dir) / name).is_dir():
        for folder in (Path(save_dir) / name).glob("version_*/checkpoints"):
            sweep_stale_temporaries(folder)
