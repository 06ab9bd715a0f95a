"""The experiment reports, and the three experiments end to end through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_base_checkpoint

from lightning_lora.cli import main
from lightning_lora.demo.nets import MLP
from lightning_lora.experiments.report import report
from lightning_lora.integration.lightning_verbs import run_lightning

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REAL_MNIST = REPO / "data"
needs_mnist = pytest.mark.skipif(
    not (REAL_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason="real MNIST not found in data/MNIST/raw (link it: ln -s ../shared/datasets data)",
)
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    return tmp_path


def fit(*args: str) -> None:
    main(["fit", *args, *QUIET])


def test_classification_report_on_synthetic_digits(workdir, fake_mnist):
    torch.manual_seed(0)
    data = ["--data.data_dir", str(fake_mnist), "--data.batch_size", "16"]
    net = ["--model.net.class_path", "lightning_lora.demo.nets.MLP", "--model.net.init_args.hidden_sizes", "[32]"]
    fit("-c", str(CONFIGS / "mlp_pretrain.yaml"), *data, *net)
    fit("-c", str(CONFIGS / "mlp_finetune_lora.yaml"), *data, *net, "--data.train_digits", "[3]")
    summary, markdown = report("runs/mlp_finetune_lora", workdir / "out")  # its base: the run it recorded
    assert summary["adapter_off_identical_to_base"] is True
    assert summary["merged_predictions_equal_unmerged"] is True
    assert summary["trained_digits"] == [3] and summary["test_samples"] == 100
    assert summary["adapter_off"] == summary["base"]
    assert sum(summary["base"]["wrong_per_digit"]) == round(100 * (1 - summary["base"]["accuracy"]))
    assert summary["parameters"]["trainable"] == 4 * (784 + 32) + 4 * (32 + 10)
    assert summary["adapter_bytes"] < summary["checkpoint_bytes"] < summary["model_bytes"]
    assert json.loads((workdir / "out" / "summary.json").read_text()) == summary
    text = Path(markdown).read_text()
    assert "| adapter off |" in text and "bit for bit" in text and "Digit 3 (trained)" in text
    assert (workdir / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert "replayed" not in text and "distilled" not in text and "rotated" not in text
    for figure in ("mistakes_per_digit.png", "confusion_matrices.png"):  # the report's pictures, real PNGs
        assert (workdir / "out" / "figures" / figure).read_bytes().startswith(b"\x89PNG"), figure


def test_a_run_holding_two_adapters_is_reported_naming_the_trained_one(workdir, fake_mnist, capsys):
    torch.manual_seed(0)
    data = ["--data.data_dir", str(fake_mnist), "--data.batch_size", "16"]
    net = ["--model.net.class_path", "lightning_lora.demo.nets.MLP", "--model.net.init_args.hidden_sizes", "[32]"]
    fit("-c", str(CONFIGS / "mlp_pretrain.yaml"), *data, *net)
    tune = ["-c", str(CONFIGS / "mlp_finetune_lora.yaml"), *data, *net]
    fit(*tune, "--data.train_digits", "[3]", "--lora.adapter_name", "digit3")
    report("runs/mlp_finetune_lora/version_0", workdir / "d3")
    fit(*tune, "--data.train_digits", "[5]", "--lora.adapter_name", "digit5", "--lora.rank", "2",
        "--lora.load_adapters", f"{{digit3: {workdir / 'd3' / 'adapter' / 'digit3'}}}")  # fmt: skip
    summary, markdown = report("runs/mlp_finetune_lora/version_1", workdir / "out")
    assert summary["adapters"] == ["digit3", "digit5"] and summary["trained_adapter"] == "digit5"
    folder = workdir / "out" / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["digit3", "digit5"]
    assert summary["adapter_weights_bytes"] == (folder / "digit5" / "adapter_model.safetensors").stat().st_size
    assert summary["adapter_bytes"] == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert "is the trained 'digit5', ['digit3'] stay off" in Path(markdown).read_text()
    assert summary["adapter_off_identical_to_base"] is True
    capsys.readouterr()
    with pytest.raises(SystemExit, match="0"):
        main(["export", "--ckpt", "runs/mlp_finetune_lora/version_1", "--out", str(workdir / "exported")])
    printed = capsys.readouterr().out
    size = sum(f.stat().st_size for f in (workdir / "exported").rglob("*") if f.is_file())
    assert f"({size:,} bytes)" in printed and "adapters ['digit3', 'digit5'] in PEFT's layout" in printed
    assert 'from_pretrained(base, path/digit3, adapter_name="digit3").load_adapter(path/digit5' in printed
    with pytest.raises(SystemExit, match="0"):
        main(["merge", "--ckpt", "runs/mlp_finetune_lora/version_1", "--out", str(workdir / "merged.safetensors")])
    assert "(adapter ['digit5'], the one the run trained; ['digit3'] left out)" in capsys.readouterr().out


def test_the_report_says_how_the_run_was_trained(workdir, fake_mnist):
    torch.manual_seed(0)
    data = ["--data.data_dir", str(fake_mnist), "--data.batch_size", "16", "--data.rotation", "30"]
    net = ["--model.net.class_path", "lightning_lora.demo.nets.MLP", "--model.net.init_args.hidden_sizes", "[32]"]
    fit("-c", str(CONFIGS / "mlp_pretrain.yaml"), *data, *net, "--trainer.max_steps", "5")
    fit("-c", str(CONFIGS / "mlp_finetune_lora.yaml"), *data, *net, "--data.train_digits", "[3]",
        "--data.replay_fraction", "0.25", "--model.distill_weight", "2", "--trainer.max_steps", "5")  # fmt: skip
    summary, markdown = report("runs/mlp_finetune_lora", workdir / "out")
    assert summary["training"]["replay_per_batch"] == 4 and summary["training"]["rotation"] == 30
    text = Path(markdown).read_text()
    assert "4 of every 16 samples replayed from the other digits" in text, text.splitlines()[2]
    assert "distilled to the base (weight 2, on retain)" in text and "rotated 30 degrees" in text
    assert " alone " not in text


def test_report_refuses_checkpoints_it_cannot_compare(workdir, fake_mnist, capsys):
    weights_only = write_base_checkpoint(workdir / "base.ckpt", MLP(hidden_sizes=[8]))
    args = ["--out", "o", "--data-dir", str(fake_mnist)]
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--finetuned", str(weights_only), *args])
    assert exit_info.value.code == 1
    assert "was not written by a Lightning run" in capsys.readouterr().err
    data = ["--data.data_dir", str(fake_mnist), "--trainer.max_steps", "2"]
    fit("-c", str(CONFIGS / "mlp_pretrain.yaml"), *data)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--finetuned", "runs/mlp_pretrain", *args])
    assert exit_info.value.code == 2
    assert "holds no LoRA adapters; pass a fine-tuning run as --finetuned" in capsys.readouterr().err


def test_shift_experiment_at_reduced_size(workdir, capsys):
    """A rank-1 adapter recovers theta + 1 from a model fitted to theta.

    The base's MSE on the shifted data is about num_features (each output gains the sum of
    101 standard-normal inputs). A learned delta off by eps per weight leaves an MSE of about
    num_features * eps**2, so MSE < num_features * 1e-4 means the shift was recovered to 1%.
    """
    sizes = ["--model.net.init_args.num_features", "101", "--model.net.init_args.num_outputs", "100"]
    sizes += ["--data.num_features", "101", "--data.num_outputs", "100", "--data.num_samples", "4000"]
    fit("-c", str(CONFIGS / "shift_pretrain.yaml"), *sizes, "--model.optimizer.init_args.lr", "10")
    fit("-c", str(CONFIGS / "shift_finetune_lora.yaml"), *sizes)
    with pytest.raises(SystemExit):
        main(["report", "--finetuned", "runs/shift_finetune_lora", "--out", "out"])
    summary = json.loads((workdir / "out" / "summary.json").read_text())
    assert abs(summary["delta_mean"] - 1.0) < 0.05
    assert summary["mse_base_on_new_data"] > 50
    assert summary["mse_merged_plain_model"] < 101 * 1e-4
    assert summary["merged_model_types"] == ["Linear", "LinearModel"]
    assert "learned delta, mean (target 1)" in capsys.readouterr().out


@pytest.mark.slow
@needs_mnist
def test_experiment_1_full_size(workdir):
    """The main job as `make demo` runs it, checked against what was logged."""
    data = ["--data.data_dir", str(REAL_MNIST)]
    fit("-c", str(CONFIGS / "pretrain.yaml"), *data)
    fit("-c", str(CONFIGS / "finetune_lora.yaml"), *data)
    cli = run_lightning(["test", "-c", str(CONFIGS / "finetune_lora.yaml"), *data, *QUIET,
                         "--ckpt_path", "runs/finetune_lora"])  # fmt: skip
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    summary, _ = report("runs/finetune_lora", "out", data_dir=str(REAL_MNIST))
    assert summary["adapter_off_identical_to_base"] is True
    assert summary["adapter_on"]["wrong_per_digit"][9] < summary["base"]["wrong_per_digit"][9]
    assert summary["parameters"]["trainable"] == 6_794
    for digit in range(10):
        assert summary["adapter_on"]["wrong_per_digit"][digit] == logged[f"test/wrong_digit_{digit}"]
        assert summary["base"]["wrong_per_digit"][digit] == logged[f"test/wrong_digit_{digit}_base"]
    assert summary["adapter_on"]["accuracy"] == pytest.approx(logged["test/acc"], abs=1e-6)
    assert summary["base"]["accuracy"] == pytest.approx(logged["test/acc_base"], abs=1e-6)
    assert (workdir / "out" / "summary.md").is_file() and (workdir / "out" / "summary.json").is_file()


@pytest.mark.slow
@needs_mnist
def test_experiment_2_reduced_size(workdir):
    data = ["--data.data_dir", str(REAL_MNIST), "--trainer.limit_train_batches", "100"]
    data += ["--trainer.limit_val_batches", "10"]
    fit("-c", str(CONFIGS / "mlp_pretrain.yaml"), *data)
    fit("-c", str(CONFIGS / "mlp_finetune_lora.yaml"), *data)
    summary, _ = report("runs/mlp_finetune_lora", "out", data_dir=str(REAL_MNIST))
    assert summary["merged_predictions_equal_unmerged"] is True
    assert summary["merged_max_abs_logit_difference"] < 1e-4
    assert summary["adapter_off_identical_to_base"] is True
    assert summary["base"]["accuracy"] > 0.85
