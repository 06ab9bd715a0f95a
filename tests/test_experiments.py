"""The experiments behind the README: pipelines, sweeps, records, figures, and the README generated from them.

Each runs for real on synthetic MNIST, cut down (fewer settings and steps), in a folder of its own
that sees the repository's configs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import write_fake_mnist

from lightning_lora.experiments import forgetting, pipeline, rank_sweep, readme

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with the repository's configs and a synthetic MNIST large enough for the configs."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    write_fake_mnist(tmp_path / "mnist", train_per_digit=150, test_per_digit=20)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    return tmp_path


def test_the_forgetting_sweep_records_each_setting_and_draws_the_trade_off(workdir, monkeypatch):
    short = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    monkeypatch.setattr(forgetting, "SETTINGS", [("plain", short), ("replay 0.5 + distill 1",
                        ["--data.replay_fraction", "0.5", "--model.distill_weight", "1", *short])])  # fmt: skip
    path = forgetting.run("mnist", workdir / "results")
    record = json.loads(path.read_text())
    assert [row["label"] for row in record["settings"]] == ["plain", "replay 0.5 + distill 1"]
    for row in record["settings"]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["retain_accuracy"] <= 1 and row["target_wrong"] >= 0
        assert Path(row["run"]).is_dir() and row["seconds"] > 0
    assert record["base"]["target_wrong"] == record["base"]["wrong_per_digit"][9]
    assert Path(record["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["environment"]["torch"]
    assert "| plain | " in readme.demo_forgetting(record)


def test_the_rank_sweep_tunes_a_rate_per_setting_and_compares_lora_with_full_fine_tuning(workdir, monkeypatch):
    monkeypatch.setattr(rank_sweep, "RANKS", (1, 4))
    monkeypatch.setattr(rank_sweep, "LORA_RATES", (1e-3, 1e-2))
    monkeypatch.setattr(rank_sweep, "FULL_RATES", (1e-4,))
    monkeypatch.setattr(rank_sweep, "STEPS", 3)
    record = json.loads(rank_sweep.run("mnist", workdir / "results").read_text())
    assert [row["label"] for row in record["settings"]] == ["r=1", "r=4", "full"]
    low, high, full = record["settings"]
    assert low["learning_rates_tried"] == [1e-3, 1e-2] and full["learning_rates_tried"] == [1e-4]
    assert low["trainable"] < high["trainable"] < full["trainable"]
    assert "--lora.rank 4 --lora.alpha 8" in high["command"] and "--data.rotation 45" in high["command"]
    assert Path(record["figure"]).is_file()
    assert "| LoRA r=4 | " in readme.demo_rank_sweep(record)


def test_a_pipeline_prints_and_times_each_stage_and_records_them(workdir, monkeypatch, capsys):
    monkeypatch.setitem(
        pipeline.PIPELINES,
        "tiny",
        pipeline.Pipeline("tiny", [["inspect", "-c", "configs/finetune_lora.yaml"], ["--version"]], "runs/x"),
    )
    monkeypatch.setattr(pipeline, "latest_report", lambda run: {"from": run})
    record = json.loads(pipeline.run_pipeline("tiny", "mnist", workdir / "results").read_text())
    out = capsys.readouterr().out
    assert "[1/2] lightning-lora inspect -c configs/finetune_lora.yaml" in out and "[2/2] done in" in out
    assert [s["command"] for s in record["stages"]] == [
        "lightning-lora inspect -c configs/finetune_lora.yaml",
        "lightning-lora --version",
    ]
    assert (
        record["summary"] == {"from": "runs/x"}
        and record["total_seconds"] >= sum(s["seconds"] for s in record["stages"]) - 0.2
    )
    monkeypatch.setitem(pipeline.PIPELINES, "broken", pipeline.Pipeline("broken", [["fit", "-c", "none.yaml"]], "x"))
    with pytest.raises(SystemExit) as exit_info:
        pipeline.run_pipeline("broken", "mnist", workdir / "results")
    assert exit_info.value.code == 2 and not (workdir / "results/broken.json").exists()


def test_the_readme_generator_rewrites_only_its_blocks_and_refuses_a_missing_record():
    text = "intro\n<!-- results:startup -->\nold\n<!-- /results:startup -->\noutro 12.5%\n"
    record = {"runs": 3, "rows": [{"command": "lightning-lora --help", "seconds": 0.21, "ratio": 0.05}]}
    fresh = readme.render(text, {"startup": record})
    assert fresh.startswith("intro\n<!-- results:startup -->\n| command |") and fresh.endswith("outro 12.5%\n")
    assert "| `lightning-lora --help` | 0.21 s | 0.05x |" in fresh and "old" not in fresh
    assert readme.render(fresh, {"startup": record}) == fresh
    with pytest.raises(KeyError, match="has no record"):
        readme.render(text, {})
