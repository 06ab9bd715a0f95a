"""The ``lightning-lora`` command line.

    lightning-lora fit -c configs/pretrain.yaml                    # pretrain the base
    lightning-lora fit -c configs/finetune_lora.yaml               # LoRA fine-tune on digit 9
    lightning-lora fit -c configs/finetune_lora.yaml --lora.rank 4 # the same, other LoRA settings
    lightning-lora test -c configs/finetune_lora.yaml --ckpt_path runs/finetune_lora
    lightning-lora inspect -c configs/finetune_lora.yaml           # which layers get adapters, no training
    lightning-lora export --ckpt runs/finetune_lora --out adapter/ # PEFT-format adapter folder
    lightning-lora merge --ckpt runs/finetune_lora --out merged.safetensors
    lightning-lora report --finetuned runs/finetune_lora           # adapter on / off / merged, per digit

``fit``/``validate``/``test``/``predict`` are LightningCLI's; the other verbs never import
Lightning. Nothing ends in a traceback: an expected failure is one paragraph naming the value
and the fix (exit code 2 for a usage error, 1 for a failure while running), an unexpected one
says it is a bug; ``LIGHTNING_LORA_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning_lora._version import __version__
from lightning_lora.cli.ddp_peers import stopped_peer
from lightning_lora.errors import ResumeError, UsageError

LIGHTNING_VERBS = {
    "fit": "Train: pretrain a base, or fine-tune LoRA adapters (-c CONFIG, --lora.* settings).",
    "validate": "Evaluate a model on the validation split (--ckpt_path RUN_OR_CKPT).",
    "test": "Evaluate a model on the test split, adapter on and off (--ckpt_path RUN_OR_CKPT).",
    "predict": "Predict digits for the test split (--ckpt_path RUN_OR_CKPT).",
}
OWN_VERBS = {  # verb: (module, function); their descriptions live beside them
    "inspect": ("lightning_lora.cli.file_verbs", "inspect_command"),
    "export": ("lightning_lora.cli.file_verbs", "export_command"),
    "merge": ("lightning_lora.cli.file_verbs", "merge_command"),
    "report": ("lightning_lora.cli.file_verbs", "report_command"),
}


def _help() -> str:
    from lightning_lora.cli import file_verbs as commands

    described = {**LIGHTNING_VERBS, **{v: getattr(commands, v.upper()) for v in OWN_VERBS}}
    width = max(map(len, described))
    lines = [
        f"lightning-lora {__version__}: LoRA fine-tuning for PyTorch Lightning",
        "",
        "usage: lightning-lora <command> [options]     (lightning-lora <command> --help for its options)",
        "",
        "commands:",
        *(f"  {verb:<{width}}  {text}" for verb, text in described.items()),
        "",
        "options: -h, --help    this message;  -V, --version    the version",
    ]
    return "\n".join(lines)


def _fail(verb: str, message: str, code: int, err: BaseException | None = None) -> NoReturn:
    if not _said_by_rank_zero(err):
        print(f"lightning-lora{' ' + verb if verb else ''}: error: {message}".rstrip(), file=sys.stderr)
    raise SystemExit(code)


def _said_by_rank_zero(err: BaseException | None) -> bool:
    """A resume refusal comes alike from every DDP process (each reads the same checkpoint and settings), so only
    the first process prints it; Lightning's launcher gives the others a nonzero ``LOCAL_RANK`` or ``NODE_RANK``."""
    return isinstance(err, ResumeError) and any(
        os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "NODE_RANK")
    )


def _runtime_errors() -> tuple[type[BaseException], ...]:
    from lightning_lora.errors import LightningLoRAError

    return (LightningLoRAError, ValueError, OSError)


def _is_sigterm(err: SystemExit) -> bool:
    """Lightning's ``SIGTERMException`` (a ``SystemExit``), recognised by type; only a run that imported
    Lightning can raise it."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(err, exceptions.SIGTERMException)


def _sigterm_report() -> str:
    from lightning_lora.integration.lora_cli import sigterm_report

    return sigterm_report()


def _run(verb: str, argv: list[str]) -> None:
    if verb in OWN_VERBS:
        module, function = OWN_VERBS[verb]
        raise SystemExit(getattr(importlib.import_module(module), function)(argv))
    from lightning_lora.integration import benign_warnings

    benign_warnings.install()  # before Lightning is imported: some of its warnings fire at import
    import lightning_lora.demo.classifiers  # noqa: F401  (so short class names such as LitClassifier resolve)
    import lightning_lora.demo.mnist_datamodule  # noqa: F401
    import lightning_lora.demo.nets  # noqa: F401
    import lightning_lora.demo.shift_datamodule  # noqa: F401
    from lightning_lora.integration.lightning_verbs import run_lightning

    run_lightning([verb, *argv])


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point.

    Exit codes: 0 success, 2 a usage error (a bad flag, config value or path), 1 a failure
    while running (missing or damaged data, a broken file, a non-finite loss, a full disk),
    130 interrupted, 143 stopped by SIGTERM.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        raise SystemExit(0)
    if argv[0] in ("-V", "--version"):
        print(f"lightning-lora {__version__}")
        raise SystemExit(0)
    verb = argv[0]
    if verb not in LIGHTNING_VERBS and verb not in OWN_VERBS:
        _fail("", f"unknown command {verb!r}; the commands are {', '.join([*LIGHTNING_VERBS, *OWN_VERBS])}", 2)
    traceback_wanted = os.environ.get("LIGHTNING_LORA_TRACEBACK") == "1"
    try:
        _run(verb, argv[1:])
    except SystemExit as err:
        if _is_sigterm(err) and not traceback_wanted:
            _fail(verb, _sigterm_report(), 143)  # 128 + SIGTERM, so a chain of commands stops here
        if isinstance(err.__context__, KeyboardInterrupt) and not traceback_wanted:
            _fail(verb, "interrupted", 130)  # Lightning turns Ctrl-C into exit code 1 after its clean shutdown
        raise
    except UsageError as err:
        if traceback_wanted:
            raise
        _fail(verb, str(err), 2, err)
    except KeyboardInterrupt:
        if traceback_wanted:
            raise
        _fail(verb, "interrupted", 130)
    except BaseException as err:
        if traceback_wanted:
            raise
        if isinstance(err, OSError):  # a library's write: name its file and the cause, as ours do
            from lightning_lora.core.safe_io import explain_os_error

            err = explain_os_error(err) or err
        if isinstance(err, _runtime_errors()):
            _fail(verb, str(err), 1, err)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        peer = stopped_peer()
        if peer is not None:  # the error is only this process's view of another one's death
            _fail(
                verb,
                f"{peer}, and this process stopped with it ({type(err).__name__}: {first_line}). That process's own "
                "output says why, if it could write any (a SIGKILL, such as the out-of-memory killer's, leaves none). "
                "Resume the run with --ckpt_path and its run folder (its newest checkpoint)",
                1,
            )
        _fail(
            verb,
            f"unexpected {type(err).__name__}: {first_line}\n"
            "This is a bug in lightning-lora (or a library it uses). Run again with LIGHTNING_LORA_TRACEBACK=1 "
            "to see the traceback, and please report it.",
            1,
        )


if __name__ == "__main__":
    main()


__all__ = ["main"]
