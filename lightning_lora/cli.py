"""The ``lightning-lora`` command line.

    lightning-lora fit -c configs/pretrain.yaml                 # pretrain the base
    lightning-lora fit -c configs/finetune_lora.yaml            # LoRA fine-tune on digit 9
    lightning-lora fit -c configs/finetune_lora.yaml -c configs/ddp.yaml   # the same on 2 processes
    lightning-lora test -c configs/finetune_lora.yaml --ckpt_path CKPT
    lightning-lora inspect -c configs/finetune_lora.yaml        # which layers get adapters, no training
    lightning-lora export --ckpt CKPT --out adapter/            # adapter folder (safetensors)
    lightning-lora merge --ckpt CKPT --out model.pt2            # merged plain model, no lightning_lora needed
    lightning-lora report --base CKPT --finetuned CKPT --out DIR  # adapter on / off / merged, per digit

``fit``/``validate``/``test``/``predict`` are LightningCLI's; the other verbs are dispatched
by :func:`main` before LightningCLI sees the arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_lora.adapter_files import save_adapter
from lightning_lora.config import LoRAConfig
from lightning_lora.errors import NonFiniteLossError, UsageError, root_cause
from lightning_lora.files import atomic_file
from lightning_lora.inject import (
    count_parameters,
    get_lora_config,
    inject_lora,
    lora_layers,
    merge_and_unload,
)
from lightning_lora.module import NetModule, build_net, load_trained, read_checkpoint_state

CALLBACK_NAME = "LoRAInjectionCallback"


class LoRACLI(LightningCLI):
    """LightningCLI whose construction errors are reported as usage errors, by their root cause."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps the constructor's own error
            raise UsageError(str(root_cause(err))) from err

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (weights-only) and do *not* read model settings from it.

        LightningCLI's own version reads the checkpoint's hyper-parameters and lets them override
        the config: a stored relative ``base_checkpoint`` then beats the one given on the command
        line, and a stored ``_class_path`` can switch the model class. Here the config (YAML and
        command line) alone decides the model; the checkpoint's adapters are checked against it
        (LoRACheckpointMixin: same LoRA settings, same base). LightningCLI offers no public switch
        for this, so this private method is overridden, in this one place; ``tests/test_cli.py``
        fails if LightningCLI stops calling it.
        """
        path = self.config[self.config.subcommand].get("ckpt_path")
        if path is not None and path not in ("last", "best", "hpc", "registry"):  # Lightning's keywords
            try:
                read_checkpoint_state(path, "ckpt_path")
            except (ValueError, FileNotFoundError) as err:
                raise UsageError(str(err)) from err


def run_lightning(args: Sequence[str] | None = None) -> LightningCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``).

    Model and data are chosen by ``class_path`` (any :class:`NetModule` and any
    ``LightningDataModule``), so the classifier and the regression experiment share one command.
    """
    return LoRACLI(
        NetModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        auto_configure_optimizers=False,  # its optimizer would be built before the adapters exist
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="lightning_lora", default_hp_metric=False)
        },
    )


def _merge_configs(paths: Sequence[str]) -> dict[str, Any]:
    """Read YAML configs in order; later ones override earlier ones (lists are replaced)."""

    def merge(into: dict, update: dict) -> dict:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value
        return into

    merged: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must be a YAML mapping")
        merge(merged, data)
    return merged


def lora_config_from(config: dict[str, Any]) -> LoRAConfig | None:
    """The LoRAConfig of the config's ``LoRAInjectionCallback``, or ``None`` if it has none."""
    names = {f.name for f in fields(LoRAConfig)}
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith(CALLBACK_NAME):
            init_args = callback.get("init_args") or {}
            return LoRAConfig(**{k: v for k, v in init_args.items() if k in names and v is not None})
    return None


def inspect_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-lora inspect",
        description="List the layers a config's LoRAInjectionCallback adapts, with shapes and added parameters, "
        "without reading data or training.",
    )
    parser.add_argument("-c", "--config", action="append", required=True, help="YAML config (repeatable)")
    opts = parser.parse_args(argv)
    config = _merge_configs(opts.config)
    model = config.get("model") or {}
    net_config = (model.get("init_args") or model).get("net")
    if not isinstance(net_config, dict):
        raise ValueError("the config has no model.net with class_path and init_args")
    lora = lora_config_from(config)
    if lora is None:
        raise ValueError(f"the config lists no {CALLBACK_NAME} under trainer.callbacks: nothing would be injected")
    net = build_net(net_config)
    inject_lora(net, lora)
    rows = [
        (
            name,
            " x ".join(str(d) for d in layer.base_weight().shape),
            sum(p.numel() for n, p in layer.named_parameters(recurse=False) if n.startswith("lora_")),
        )
        for name, layer in lora_layers(net)
    ]
    width = max(len(r[0]) for r in rows + [("module", "", 0)])
    print(f"{'module':<{width}}  {'weight shape':>18}  {'adds':>10}")
    for name, shape, added in rows:
        print(f"{name:<{width}}  {shape:>18}  {added:>10,}")
    print(f"{lora}\n{count_parameters(net)}")
    return 0


def export_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-lora export",
        description="Write a checkpoint's adapter as a folder (config JSON + safetensors).",
    )
    parser.add_argument("--ckpt", required=True, help="a fine-tuning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="the adapter folder to write (replaced atomically)")
    opts = parser.parse_args(argv)
    model = load_trained(opts.ckpt)
    if get_lora_config(model.net) is None:
        raise ValueError(f"checkpoint {opts.ckpt} holds no LoRA adapters; export needs a fine-tuning checkpoint")
    path = save_adapter(model.net, opts.out)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"adapter written to {path} ({size:,} bytes)")
    return 0


def merge_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-lora merge",
        description="Merge a checkpoint's adapters into the weights and write a plain exported program "
        "(torch.export .pt2). Load it without lightning_lora: torch.export.load(path).module()(x).",
    )
    parser.add_argument("--ckpt", required=True, help="a fine-tuning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="the file to write, e.g. merged.pt2 (replaced atomically)")
    parser.add_argument(
        "--input-shape", type=int, nargs="+", default=[1, 28, 28], help="one sample's shape (default: 1 28 28)"
    )
    opts = parser.parse_args(argv)
    model = load_trained(opts.ckpt)
    net = merge_and_unload(model.net).eval()
    example = torch.zeros(2, *opts.input_shape)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with atomic_file(opts.out) as tmp:
        torch.export.save(program, tmp)
    print(f"merged model written to {opts.out}")
    return 0


def report_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-lora report",
        description="Compare a pretrained model with its LoRA fine-tune (adapter on, off and merged) on the "
        "test split; print the report and write summary.md, summary.json and the adapter into --out.",
    )
    parser.add_argument("--base", required=True, help="the pretraining checkpoint")
    parser.add_argument("--finetuned", required=True, help="the fine-tuning checkpoint")
    parser.add_argument("--out", required=True, help="folder for summary.md, summary.json and adapter/")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw/ (default: the fine-tune's data_dir)")
    parser.add_argument("--merged", help="a file from `lightning-lora merge` to check against the unmerged model")
    opts = parser.parse_args(argv)
    from lightning_lora.report import report

    _, markdown_path = report(opts.base, opts.finetuned, opts.out, opts.data_dir, opts.merged)
    print(Path(markdown_path).read_text())
    return 0


VERBS: dict[str, Callable[[Sequence[str]], int]] = {
    "inspect": inspect_command,
    "export": export_command,
    "merge": merge_command,
    "report": report_command,
}


RUNTIME_ERRORS = (ValueError, OSError, NonFiniteLossError)


def _fail(verb: str, error: BaseException, code: int) -> NoReturn:
    """One paragraph on stderr, no traceback (set LIGHTNING_LORA_TRACEBACK=1 to see it)."""
    if os.environ.get("LIGHTNING_LORA_TRACEBACK") == "1":
        raise error
    print(f"lightning-lora {verb}: error: {error}", file=sys.stderr)
    raise SystemExit(code)


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point: extra verbs first, then LightningCLI.

    Exit codes: 0 success, 2 a usage error (a bad flag, config value or path), 1 a failure
    while running (missing data, a broken file, a non-finite loss).
    """
    argv = list(sys.argv[1:] if args is None else args)
    verb = argv[0] if argv else ""
    try:
        if verb in VERBS:
            raise SystemExit(VERBS[verb](argv[1:]))
        run_lightning(args)
    except UsageError as err:
        _fail(verb, err, 2)
    except RUNTIME_ERRORS as err:
        _fail(verb, err, 1)
    except SIGTERMException:
        print(
            f"lightning-lora {verb}: stopped by SIGTERM after saving a checkpoint (last.ckpt in the "
            "ModelCheckpoint folder); resume with --ckpt_path pointing at it",
            file=sys.stderr,
        )
        raise SystemExit(143) from None  # 128 + SIGTERM, so a chain of commands stops here


if __name__ == "__main__":
    main()


__all__ = ["main", "run_lightning"]
