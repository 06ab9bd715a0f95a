"""The experiments behind the README: pipelines, sweeps, records, figures, and the README generated from them.

Each runs for real on synthetic MNIST, cut down (fewer settings and steps), in a folder of its own
that sees the repository's configs.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from helpers import write_fake_mnist

from lightning_lora.experiments import forgetting, pipeline, rank_sweep, readme, two_adapters

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


def test_two_adapters_are_trained_apart_served_per_sample_and_merged(workdir, monkeypatch):
    monkeypatch.setattr(two_adapters, "FINETUNE", ["-c", "configs/finetune_lora.yaml", "--trainer.max_steps", "4",
                                                   "--trainer.val_check_interval", "2"])  # fmt: skip
    record = json.loads(two_adapters.run("mnist", workdir / "results").read_text())
    labels = [row["label"] for row in record["rows"]]
    assert labels == ["base", "digit9 alone", "digit4 alone", "per sample, one batch", "weighted merge (cat, 1 + 1)"]
    assert record["per_sample_max_difference"] < 1e-5  # every sample of the mixed batch as with its adapter alone
    assert sorted(p.name for p in Path(record["adapters"]).iterdir()) == ["digit4", "digit9"]
    assert Path(record["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| per sample, one batch | " in readme.demo_two_adapters(record)
    pasted = shlex.split(record["stages"][1]["command"])  # the recorded command pastes into a shell as it ran
    assert pasted[pasted.index("--lora.load_adapters") + 1].startswith("{digit9: ")


def test_the_rank_sweep_tunes_a_rate_per_setting_and_compares_lora_with_full_fine_tuning(workdir, monkeypatch):
    monkeypatch.setattr(rank_sweep, "RANKS", (1, 4))
    monkeypatch.setattr(rank_sweep, "LORA_RATES", (1e-3, 1e-2))
    monkeypatch.setattr(rank_sweep, "FULL_RATES", (1e-4,))
    monkeypatch.setattr(rank_sweep, "STEPS", 3)
    monkeypatch.setattr(rank_sweep, "MAX_WIDENING", 0)  # the widening has its own test
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


def _summary(base_wrong: int, adapter_wrong: int, base_acc: float = 0.95) -> dict:
    def side(accuracy, wrong):
        return {"accuracy": accuracy, "retain_accuracy": accuracy, "wrong_per_digit": [0] * 9 + [wrong]}

    return {"trained_digits": [9], "base": side(base_acc, base_wrong), "adapter_on": side(0.93, adapter_wrong)}


def test_a_users_run_writes_its_record_under_runs_never_into_the_committed_records(monkeypatch):
    """`make demo` then `make test` must pass: the demo may not rewrite a tracked record (test_readme reads them)."""
    import subprocess

    chosen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda name, data, results: chosen.append(results))
    monkeypatch.setattr(pipeline, "run_spread", lambda data, results: chosen.append(results))
    for experiment in ["demo", "demo-mlp", "demo-shift", "demo-seeds"]:
        pipeline.main([experiment])
    for sweep in (forgetting, rank_sweep, two_adapters):
        monkeypatch.setattr(sweep, "run", lambda data, results: chosen.append(results))
        sweep.command_line("x", None, sweep.run)([])
    assert chosen and set(chosen) == {pipeline.RUN_RECORDS}
    ignored = subprocess.run(["git", "check-ignore", "-q", str(pipeline.RUN_RECORDS / "demo.json")], cwd=REPO)
    assert ignored.returncode == 0, f"{pipeline.RUN_RECORDS} must be git-ignored"
    dry = subprocess.run(["make", "-n", "--no-print-directory", "demo", "demo-mlp", "demo-shift", "demo-forgetting",
                          "demo-rank-sweep", "demo-two-adapters", "demo-seeds"], cwd=REPO, capture_output=True,
                         text=True)  # fmt: skip
    assert dry.returncode == 0 and "lightning_lora.experiments" in dry.stdout
    assert str(pipeline.RESULTS) not in dry.stdout, "a make target other than `make results` writes the records"
    publish = subprocess.run(["make", "-n", "results"], cwd=REPO, capture_output=True, text=True)
    assert f"RESULTS={pipeline.RESULTS}" in publish.stdout and "experiments.readme" in publish.stdout


def test_a_seeded_stage_runs_its_whole_chain_in_its_own_folder_with_that_seed():
    fit_base, fit_tune, test, report = pipeline.PIPELINES["demo"].stages
    root = "runs/seeds/seed_7"
    tune = pipeline.seeded(fit_tune, 7, root)
    assert tune[: len(fit_tune)] == fit_tune and tune[tune.index("--seed_everything") + 1] == "7"
    assert tune[tune.index("--data.seed") + 1] == "7"
    assert tune[tune.index("--trainer.logger.init_args.save_dir") + 1] == root
    assert tune[tune.index("--model.init_args.base_checkpoint") + 1] == f"{root}/pretrain"
    assert "--model.init_args.base_checkpoint" not in pipeline.seeded(fit_base, 7, root)  # pretraining has no base
    assert pipeline.seeded(test, 7, root)[test.index("--ckpt_path") + 1] == f"{root}/finetune_lora"
    assert pipeline.seeded(report, 7, root) == [a.replace("runs/", f"{root}/") for a in report]


def test_the_spread_records_every_seed_and_each_headlines_mean_and_range(tmp_path, monkeypatch):
    import subprocess

    ran = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: ran.append(args) or subprocess.CompletedProcess(args, 0))
    monkeypatch.setattr(pipeline, "latest_report", lambda run: _summary(60, int(run.split("seed_")[1].split("/")[0])))
    monkeypatch.chdir(REPO)  # the configs are read to move base_checkpoint
    record = json.loads(pipeline.run_spread("mnist", tmp_path, seeds=(10, 20, 30)).read_text())
    assert len(ran) == 3 * len(pipeline.PIPELINES["demo"].stages)
    assert [row["seed"] for row in record["per_seed"]] == [10, 20, 30]
    mistakes = record["headlines"]["adapter mistakes on the trained digit"]
    assert mistakes == {"mean": 20, "min": 10, "max": 30}
    table = readme.demo_seeds(record)
    assert "| adapter mistakes on the trained digit | 10 | 20 | 30 | 20 | 10 to 30 |" in table


def test_the_demo_says_where_its_result_falls_against_the_published_spread(tmp_path):
    spread = {"seeds": [1, 2], "environment": {"cpu": "Some CPU", "torch": "2.x"}, "headlines": {
        "adapter mistakes on the trained digit": {"mean": 12, "min": 10, "max": 14},
        "base accuracy": {"mean": 0.95, "min": 0.94, "max": 0.96}}}  # fmt: skip
    (tmp_path / f"{pipeline.SPREAD}.json").write_text(json.dumps(spread))
    lines = "\n".join(pipeline.against_the_spread(_summary(60, 16), tmp_path))
    assert "adapter mistakes on the trained digit: 16, above the range 10 to 14 (mean 12)" in lines
    assert "base accuracy: 95.00%, inside the range 94.00% to 96.00%" in lines and "depend on the CPU" in lines
    assert "no published spread" in pipeline.against_the_spread(_summary(60, 16), tmp_path / "none")[0]


def test_the_constraints_pin_the_versions_the_committed_records_were_measured_with():
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in makefile, "make's install must use the constraints"
    env = json.loads((REPO / "benchmarks/results/demo.json").read_text())["environment"]
    assert pins["torch"] == env["torch"].split("+")[0] and pins["lightning"] == env["lightning"]
    for package in ("torchvision", "torchmetrics", "tensorboard", "safetensors", "peft", "transformers"):
        assert package in pins, f"{package} is not pinned"


def test_the_half_decade_grid_steps_both_ways():
    assert [rank_sweep.neighbour(r, up=True) for r in (1e-3, 3e-3, 1e-2)] == pytest.approx([3e-3, 1e-2, 3e-2])
    assert [rank_sweep.neighbour(r, up=False) for r in (1e-3, 3e-3, 1e-2)] == pytest.approx([3e-4, 1e-3, 3e-3])


def test_the_rank_sweep_widens_its_grid_until_the_best_rate_is_inside(workdir, monkeypatch):
    """A best rate at the grid's edge says nothing about the rates beyond it: the sweep tries them."""
    monkeypatch.setattr(rank_sweep, "RANKS", (1,))
    monkeypatch.setattr(rank_sweep, "LORA_RATES", (1e-3, 3e-3))
    monkeypatch.setattr(rank_sweep, "FULL_RATES", (1e-4,))
    monkeypatch.setattr(rank_sweep, "STEPS", 2)
    monkeypatch.setattr(rank_sweep, "MAX_WIDENING", 2)
    peak = {"r=1": 1e-2, "full": 1e-5}  # pretend validation accuracy peaks there
    real_fit = rank_sweep.fit

    def fit(args):
        cli, seconds = real_fit(args)
        rate = float(args[args.index("--model.optimizer.init_args.lr") + 1])
        cli.model.net.fake_rate = rate
        return cli, seconds

    def accuracy(net, data):
        label = "full" if not any("lora" in n for n, _ in net.named_parameters()) else "r=1"
        return 1 / (1 + abs(math.log10(net.fake_rate / peak[label])))

    import math

    monkeypatch.setattr(rank_sweep, "fit", fit)
    monkeypatch.setattr(rank_sweep, "_accuracy", lambda net, data: accuracy(net, data) if hasattr(net, "fake_rate")
                        else 0.5)  # fmt: skip
    record = json.loads(rank_sweep.run("mnist", workdir / "results").read_text())
    lora, full = record["settings"]
    assert lora["learning_rates_tried"] == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2])  # widened up to 1e-2, past it
    assert lora["lr"] == pytest.approx(1e-2) and lora["best_inside_grid"]
    assert [s["lr"] for s in lora["scores"]] == lora["learning_rates_tried"]
    assert full["learning_rates_tried"] == pytest.approx([1e-5, 3e-5, 1e-4, 3e-4])  # one rate: both sides first
    assert not full["best_inside_grid"]  # 1e-5 is beyond two widenings: recorded, and said in the README
    assert "still at the edge after widening: full" in readme.demo_rank_sweep(record)


@pytest.mark.parametrize("script", ["startup.py", "validation_cost.py"])
def test_a_benchmark_run_by_hand_writes_its_record_where_git_ignores_it(script):
    """Like `make demo`: only an explicit --results benchmarks/results changes the committed records."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "default: runs/records" in " ".join(done.stdout.split()), done.stdout
