"""``fit``, ``validate``, ``test`` and ``predict``: LightningCLI's verbs, run through :class:`LoRACLI`.

Before LightningCLI sees the command line, the config files are checked (each exists and is YAML,
with the file named in the error) and ``--ckpt_path`` is taken off it and handed to the CLI class,
which gives it to the Trainer itself (see :class:`~lightning_lora.integration.lora_cli.LoRACLI`).
A run that fails before it trained anything leaves no version folder behind.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from jsonargparse import lazy_instance
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_lora.core.safe_io import explain_os_error
from lightning_lora.core.write_errors import WRITE_CAUSES
from lightning_lora.errors import UsageError
from lightning_lora.integration.lora_cli import LoRACLI, ShortErrorParser, discard_empty_run, run_folder

CKPT_PATH = "--ckpt_path"
_THREAD_HOOK = threading.excepthook


def _quiet_write_failures(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread fails on a full or read-only disk with a traceback of its own; the run
    then fails in the main thread too, which names the folder and the cause: print nothing here."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_CAUSES:
        return
    _THREAD_HOOK(args)


def check_config_files(args: Sequence[str]) -> None:
    """Each ``-c``/``--config`` file exists and is YAML (jsonargparse's errors do not name the file).

    A ``ckpt_path`` in a config file is refused: ``--ckpt_path`` is taken on the command line only
    (where LightningCLI never reads the checkpoint's settings into the config).
    """
    import yaml

    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None:
            continue
        if not Path(path).is_file():
            raise UsageError(f"config {path} does not exist")
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise UsageError(f"config {path} is not valid YAML: {' '.join(str(err).split())}") from err
        except (UnicodeDecodeError, OSError) as err:
            raise UsageError(f"config {path} cannot be read as UTF-8 text ({err})") from err
        if isinstance(data, dict) and data.get("ckpt_path") is not None:
            raise UsageError(
                f"config {path} sets ckpt_path; give it on the command line instead ({CKPT_PATH} <run or .ckpt>)"
            )


def take_ckpt_path(args: Sequence[str]) -> tuple[list[str], str | None]:
    """``args`` without ``--ckpt_path VALUE`` (or ``--ckpt_path=VALUE``), and that value (the last one given)."""
    rest, value, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == CKPT_PATH:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UsageError(f"{CKPT_PATH} needs a value: a .ckpt file, a run folder, or 'last'")
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith(CKPT_PATH + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if value is not None and not value.strip():
        raise UsageError(f"{CKPT_PATH} needs a value, got {value!r}")
    if value in ("null", "None"):
        value = None
    return rest, value


def run_lightning(args: Sequence[str]) -> LoRACLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``).

    Model and data are chosen by ``class_path`` (any ``LightningModule``: this package's
    ``NetModule`` classes or the user's own, and any ``LightningDataModule``), so the classifier,
    the regression experiment and a user's module share one command. Short class names (``--model
    LitClassifier``) resolve for the classes imported before (the command line imports the demo's).
    """
    check_config_files(args)
    command, ckpt_path = take_ckpt_path(args)
    sys.argv = [sys.argv[0], *args]  # the whole command: Lightning's DDP launcher starts the other ranks with it
    threading.excepthook = _quiet_write_failures
    try:
        return LoRACLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=None,
            auto_configure_optimizers=False,  # its optimizer would be built before the adapters exist
            save_config_kwargs={"overwrite": True},
            parser_class=ShortErrorParser,
            trainer_defaults={
                "logger": lazy_instance(
                    TensorBoardLogger, save_dir="runs", name="lightning_lora", default_hp_metric=False
                )
            },
            command=command,
            ckpt_path=ckpt_path,
        )
    except OSError as err:
        discard_empty_run()
        raise explain_os_error(err, run_folder()) or err from err
    except BaseException:
        discard_empty_run()
        raise
