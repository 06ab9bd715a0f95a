"""``lightning-lora report``: what a fine-tune changed, written into the run's own folder.

Finds the runs by name (the fine-tune's latest version unless told; its base from what it
recorded), evaluates (:mod:`~lightning_lora.experiments.evaluate`), and writes ``summary.json``,
``summary.md`` and the exported ``adapter/`` (:mod:`~lightning_lora.experiments.render` formats).
The report folder belongs to the report: anything else found in it stops the report before it
writes a byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lightning_lora.core.active_adapters import lora_adapter_names
from lightning_lora.core.adapter_folder import save_adapter
from lightning_lora.core.adapter_layout import subfolder_of
from lightning_lora.core.model_state import active_adapter_names
from lightning_lora.core.peft_format import ADAPTER_WEIGHTS_NAME
from lightning_lora.core.safe_io import atomic_directory, atomic_file, check_folder_kind
from lightning_lora.demo.run_loading import LoadedRun, build_net, load_base_checkpoint, load_run
from lightning_lora.errors import UsageError
from lightning_lora.experiments import evaluate, render
from lightning_lora.experiments import figures as draw
from lightning_lora.integration.checkpoint_reader import describe_run

REPORT_FILES = frozenset({"summary.json", "summary.md", "adapter", "figures"})
"""What a report folder holds (and so what a report may replace)."""


def _say(message: str) -> None:
    print(f"report: {message}", flush=True)


def _write(out: Path, summary: dict[str, Any], markdown: str) -> None:
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_file(out / "summary.md") as tmp:
        tmp.write_text(markdown)


def _sizes(run: LoadedRun, out: Path) -> dict[str, Any]:
    """The exported folder (every adapter the run holds, PEFT's layout) and its sizes; the weights are the
    trained (active) adapter's."""
    folder = save_adapter(run.net, out / "adapter")
    trained = active_adapter_names(run.net)[0]
    return {
        "adapters": lora_adapter_names(run.net),
        "trained_adapter": trained,
        "adapter_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        "adapter_weights_bytes": (folder / subfolder_of(trained) / ADAPTER_WEIGHTS_NAME).stat().st_size,
        "checkpoint_bytes": run.checkpoint.stat().st_size,
        "model_bytes": sum(p.numel() * p.element_size() for p in run.net.parameters() if not p.requires_grad),
    }


def _data_args(run: LoadedRun, data_dir: str | None) -> dict[str, Any]:
    args = {k: v for k, v in run.datamodule_hyper_parameters.items() if not k.startswith("_")}
    if data_dir is not None:
        args["data_dir"] = data_dir
    return args


def _classification(tuned: LoadedRun, base: nn.Module, data_dir: str | None, merged_file: str | None):
    from lightning_lora.demo.merged_model import load_merged
    from lightning_lora.demo.mnist_datamodule import MNISTDataModule

    data = MNISTDataModule(**_data_args(tuned, data_dir))
    data.setup("test")
    merged = load_merged(merged_file) if merged_file else None
    trained = tuned.trained_digits or data.target_digits or list(range(10))  # "weakest" as the run decided it
    _say(f"evaluating {len(data.test_set):,} test images: base, adapter on, adapter off, merged")
    test = data.test_set
    summary = evaluate.evaluate_classifier(base, tuned.net, test.inputs, test.targets, merged, trained)
    summary["trained_digits"] = trained
    summary["training"] = {
        "batch_size": data.batch_size,
        "replay_per_batch": data.replay_per_batch if data.replay_fraction else 0,
        "distill_weight": float(tuned.hyper_parameters.get("distill_weight") or 0.0),
        "distill_on": tuned.hyper_parameters.get("distill_on"),
        "rotation": data.rotation,
    }
    return summary, render.classification_markdown


def _regression(tuned: LoadedRun, base: nn.Module, data_dir: str | None, merged_file: str | None):
    from lightning_lora.demo.shift_datamodule import LinearShiftDataModule

    data = LinearShiftDataModule(**_data_args(tuned, None))
    data.setup("test")
    test = data.splits["test"]
    _say(f"evaluating {len(test):,} test samples")
    return evaluate.evaluate_shift(base, tuned.net, test.inputs, test.targets, data.shift), render.regression_markdown


def report(
    finetuned: str | Path = "runs/finetune_lora",
    out_dir: str | Path | None = None,
    base: str | Path | None = None,
    data_dir: str | None = None,
    merged_file: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Write the report of a fine-tuning run; returns the summary and the path of ``summary.md``."""
    _say(f"loading the fine-tune {finetuned}")
    tuned = load_run(finetuned, base)
    if not tuned.adapted:
        raise UsageError(f"{tuned.checkpoint} holds no LoRA adapters; pass a fine-tuning run as --finetuned")
    if tuned.base_checkpoint is None:
        raise UsageError(f"{tuned.checkpoint} records no base run; pass --base <pretraining run>")
    out = Path(out_dir) if out_dir is not None else Path(describe_run(tuned.checkpoint)) / "report"
    check_folder_kind(out, REPORT_FILES, "report")
    _say(f"fine-tune {describe_run(tuned.checkpoint)}; base {describe_run(tuned.base_checkpoint)}")
    base_net = build_net(tuned.hyper_parameters.get("net"), "the fine-tune's net")
    load_base_checkpoint(base_net, tuned.base_checkpoint)  # the very base the adapters were trained on
    kind = _regression if tuned.module_class.endswith(".LitRegressor") else _classification
    summary, markdown = kind(tuned, base_net.eval(), data_dir, merged_file)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "kind": "regression" if kind is _regression else "classification",
        "finetuned_checkpoint": str(tuned.checkpoint),
        "base_checkpoint": str(tuned.base_checkpoint),
        **summary,
        **_sizes(tuned, out),
    }
    text = markdown(summary)
    _write(out, summary, text)
    pictures = _figures(summary, out) if summary["kind"] == "classification" else []
    _to_tensorboard(Path(describe_run(tuned.checkpoint)), text, pictures, tuned)
    _say(f"written to {out}")
    return summary, str(out / "summary.md")


FIGURES = {"mistakes_per_digit.png": draw.mistakes_per_digit, "confusion_matrices.png": draw.confusion_pair}


def _figures(summary: dict[str, Any], out: Path) -> list[Path]:
    _say("drawing the figures")
    with atomic_directory(out / "figures", FIGURES, "figures") as tmp:
        for name, drawing in FIGURES.items():
            drawing(summary, tmp / name)
    return [out / "figures" / name for name in FIGURES]


def _to_tensorboard(run_folder: Path, markdown: str, pictures: list[Path], tuned: LoadedRun) -> None:
    """The report beside the run's curves: summary.md as text, the figures as images (TEXT and IMAGES tabs)."""
    if not any(run_folder.glob("events.out.tfevents.*")):
        return  # not a logged run folder (a bare .ckpt elsewhere): nothing to add to
    import matplotlib.image
    from torch.utils.tensorboard import SummaryWriter

    step = int(tuned.global_step or 0)
    with SummaryWriter(log_dir=str(run_folder), filename_suffix=".report") as writer:
        writer.add_text("report/summary", markdown, step)
        for path in pictures:
            image = matplotlib.image.imread(path)[..., :3]
            writer.add_image(f"report/{path.stem}", image, step, dataformats="HWC")
