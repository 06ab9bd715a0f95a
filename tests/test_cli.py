"""The lightning-lora command line: every config, the extra verbs, DDP, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_base_checkpoint

from lightning_lora import load_adapter
from lightning_lora.cli import main
from lightning_lora.demo.classifiers import LitClassifier
from lightning_lora.demo.nets import RichBoyNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RUNS_ON_CPU = [
    ["pretrain.yaml"],
    ["finetune_lora.yaml"],
    ["finetune_dora.yaml"],
    ["finetune_lora.yaml", "bf16.yaml"],
    ["mlp_pretrain.yaml"],
    ["mlp_finetune_lora.yaml"],
    ["shift_pretrain.yaml"],
    ["shift_finetune_lora.yaml"],
]
PARSED_ONLY = [["finetune_lora.yaml", "ddp.yaml"], ["finetune_lora.yaml", "gpu.yaml", "bf16.yaml"]]


def config_args(names: list[str]) -> list[str]:
    return [arg for name in names for arg in ("-c", str(CONFIGS / name))]


def test_every_config_is_exercised():
    used = {name for combo in RUNS_ON_CPU + PARSED_ONLY for name in combo}
    assert used == {p.name for p in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("names", RUNS_ON_CPU, ids=lambda n: "+".join(n))
def test_config_runs_fast_dev_run(workdir, fake_mnist, names):
    data = [] if names[0].startswith("shift") else ["--data.data_dir", str(fake_mnist)]
    main(["fit", *config_args(names), *data, "--trainer.fast_dev_run", "1"])


@pytest.mark.parametrize("names", PARSED_ONLY, ids=lambda n: "+".join(n))
def test_overlay_configs_parse(workdir, fake_mnist, names, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(names), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "LoRAInjectionCallback" in printed
    assert ("strategy: ddp" in printed) if "ddp.yaml" in names else ("precision: bf16-mixed" in printed)


@pytest.mark.parametrize("every", [{"every_n_epochs": 1}, {"every_n_train_steps": 1}, {}], ids=str)
def test_your_own_model_checkpoint_in_a_second_config_takes_only_your_settings(workdir, fake_mnist, every):
    """It replaces the shipped ResumableCheckpoint and inherits none of its settings; its files are named by the
    step they hold (the demo logs a "step" for TensorBoard's x-axis, which must not rename them)."""
    overlay = workdir / "my.yaml"
    settings = {**every, "save_top_k": -1, "save_last": True, "save_on_train_epoch_end": True}
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": settings}]}}))  # fmt: skip
    main(["fit", *config_args(["finetune_lora.yaml"]), "-c", str(overlay), "--data.data_dir", str(fake_mnist),
          "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
          "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    folder = workdir / "runs/finetune_lora/version_0/checkpoints"
    files = sorted(p.name for p in folder.glob("epoch=*.ckpt"))
    steps = [1, 2, 3, 4] if every.get("every_n_train_steps") else [2, 4]  # else at each epoch's end
    assert files == [f"epoch={(step - 1) // 2}-step={step}.ckpt" for step in steps]
    for name in files:
        assert torch.load(folder / name, weights_only=True)["global_step"] == int(name.split("step=")[1][:-5])


@pytest.mark.gpu
def test_gpu_overlay_runs(workdir, fake_mnist):
    main(["fit", *config_args(PARSED_ONLY[1]), "--data.data_dir", str(fake_mnist), "--trainer.fast_dev_run", "1"])


def test_inspect_lists_targets_shapes_and_counts(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "-c", str(CONFIGS / "finetune_lora.yaml")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "linear1" in out and "1000 x 784" in out and "1,784" in out
    assert "linear3" in out and "10 x 2000" in out and "2,010" in out
    assert "trainable params: 6,794 || all params: 2,813,804" in out


def test_inspect_takes_the_same_lora_overrides_as_fit(workdir, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "inspect",
                "-c",
                str(CONFIGS / "finetune_lora.yaml"),
                "--lora.rank",
                "4",
                "--lora.target_modules",
                "[linear1]",
            ]
        )
    out = capsys.readouterr().out
    assert "linear1" in out and "linear2" not in out.split("LoRAConfig")[0] and "rank=4" in out
    assert "linear2 (not targeted)" in out  # the info line: what the config leaves alone


def test_inspect_takes_the_callbacks_own_options_too(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "-c", str(CONFIGS / "finetune_lora.yaml"), "--lora.module_path", "net",
              "--lora.merge_on_fit_end", "true", "--lora.rank", "2"])  # fmt: skip
    assert exit_info.value.code == 0 and "rank=2" in capsys.readouterr().out


def test_inspect_of_a_config_without_lora(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "-c", str(CONFIGS / "pretrain.yaml")])
    assert exit_info.value.code == 2
    assert "no 'lora:' section or LoRAInjectionCallback" in capsys.readouterr().err


def test_verb_errors_exit_cleanly(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", "missing.ckpt", "--out", "a"])
    assert exit_info.value.code == 1
    assert "checkpoint missing.ckpt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--ckpt", "x.ckpt"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fake_mnist):
    """A real short fine-tune then test through the CLI, with TensorBoard logs and a checkpoint."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "argv", ["lightning-lora"])
        torch.manual_seed(0)
        write_base_checkpoint(root / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
        common = [*config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist)]
        common += ["--trainer.enable_progress_bar", "false"]
        main(
            [
                "fit",
                *common,
                "--trainer.max_steps",
                "4",
                "--trainer.val_check_interval",
                "2",
                "--trainer.log_every_n_steps",
                "1",
            ]
        )
        ckpt = root / "runs/finetune_lora/version_0/checkpoints/last.ckpt"
        main(["test", *common, "--ckpt_path", "runs/finetune_lora"])  # a run folder: its latest version
    return root, ckpt


def test_export_reproduces_the_fine_tuned_predictions(trained_run, tmp_path, fake_mnist):
    root, ckpt = trained_run
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "adapter")])
    model = LitClassifier.load_from_checkpoint(ckpt).eval()
    base = LitClassifier(RichBoyNet(), base_checkpoint=str(root / "runs/pretrain/checkpoints/last.ckpt")).eval()
    load_adapter(base.net, tmp_path / "adapter")
    x = torch.randn(32, 1, 28, 28)
    assert torch.equal(base(x), model(x))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 40_000
    full_model_bytes = 4 * sum(p.numel() for p in RichBoyNet().parameters())  # 11.2 MB
    assert ckpt.stat().st_size < 0.02 * full_model_bytes  # adapter-only: under 2% of the full model


def test_merge_writes_a_safe_file_with_its_input_contract(trained_run, tmp_path):
    from safetensors.torch import load_file

    from lightning_lora import load_merged

    root, ckpt = trained_run
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged.safetensors")])
    assert exit_info.value.code == 0
    pixels = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    normalised = ((pixels.float() / 255 - 0.1307) / 0.3081).unsqueeze(1)
    model = LitClassifier.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        expected = model(normalised)
    merged = load_merged(tmp_path / "merged.safetensors")
    torch.testing.assert_close(merged(pixels), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.predict(pixels.float() / 255), expected.argmax(-1))
    assert torch.equal(merged.predict(pixels.unsqueeze(1)), expected.argmax(-1))
    with pytest.raises(ValueError, match="look normalised already"):
        merged(normalised)
    with pytest.raises(ValueError, match="0-255 pixels stored as floats: divide by 255"):
        merged(pixels.float())
    for bad in (float("nan"), float("inf")):
        spoiled = pixels.float() / 255
        spoiled[0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            merged(spoiled)
    with pytest.raises(ValueError, match=r"expected images shaped \(N, 28, 28\)"):
        merged(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    assert merged(torch.zeros(0, 1, 28, 28)).shape == (0, 10)  # an empty batch, as for uint8
    assert torch.equal(merged.double().predict(pixels), expected.argmax(-1))  # images follow the net's dtype
    plain = RichBoyNet()  # without lightning_lora's loader: plain safetensors, the class you know
    plain.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(plain(normalised), expected, atol=1e-5, rtol=1e-5)
    first = (tmp_path / "merged.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        main(["merge", "--ckpt", str(root / "runs/finetune_lora"), "--out", str(tmp_path / "merged.safetensors")])
    assert (tmp_path / "merged.safetensors").read_bytes() == first  # byte-reproducible


def event_dir(root: Path, name: str) -> Path:
    return sorted((root / "runs" / name).glob("version_*"))[-1]


def test_tensorboard_event_files_hold_scalars_and_images(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = trained_run
    tags = {"scalars": set(), "images": set()}
    for version in (root / "runs" / "finetune_lora").glob("version_*"):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        tags["scalars"] |= set(events.Tags()["scalars"])
        tags["images"] |= set(events.Tags()["images"])
    expected = {"train/loss", "train/acc", "train/loss_epoch", "train/acc_epoch"}
    expected |= {
        f"val/{part}/{name}{sfx}" for part in ("target", "retain") for name in ("loss", "acc") for sfx in ("", "_base")
    }
    expected |= {"val/target/wrong_digit_9", "val/retain/wrong_digit_4_base"}
    expected |= {"params/trainable", "params/total", "params/trainable_pct"}
    expected |= {"test/acc", "test/loss", "test/acc_base"}
    expected |= {f"test/{kind}_digit_{d}{sfx}" for kind in ("acc", "wrong") for d in range(10) for sfx in ("", "_base")}
    assert expected <= tags["scalars"], expected - tags["scalars"]
    images = {
        "test/mistakes_per_digit",
        "test/confusion_matrix",
        "test/confusion_matrix_base",
    }
    assert images <= tags["images"]


def test_every_run_records_its_settings_and_final_numbers_for_the_hparams_tab(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    root, _ = trained_run
    folder = root / "runs/finetune_lora/version_0"  # the fit's, and the test's beside it
    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert hparams["lora"]["rank"] == 1 and hparams["lora"]["target_modules"] == "all-linear"
    assert hparams["batch_size"] == 10 and hparams["data"]["trained_digits"] == [9]
    assert hparams["optimizer"]["class"] == "Adam" and hparams["optimizer"]["lr"] == 0.001  # the fit's, kept
    assert hparams["trainer"]["max_steps"] == 4
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    content = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["lora/rank"].number_value == 1 and start.hparams["optimizer/lr"].number_value == 0.001
    # the module's and the data's own arguments too, so runs compare by them
    assert start.hparams["batch_size"].number_value == 10 and start.hparams["val_per_digit"].number_value == 50
    assert start.hparams["distill_weight"].number_value == 0
    # LightningCLI's bookkeeping (_instantiator, _class_path) would be the tab's first columns
    assert not [name for name in start.hparams if name.startswith("_")]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.summary_metadata["_hparams_/experiment"].plugin_data.content
    ).experiment
    assert {"val/target/acc_base", "test/acc_base"} & {m.name.tag for m in experiment.metric_infos}


def test_a_test_logs_beside_its_fit_at_the_fit_s_last_step(trained_run):
    """No version folder of its own (which TensorBoard shows as a run of its own, at step 0): the
    test's scalars and figures join the fine-tune's, at its last step; its config does not replace the fit's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = trained_run
    assert [p.name for p in (root / "runs/finetune_lora").iterdir()] == ["version_0"]
    folder = root / "runs/finetune_lora/version_0"
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["val_check_interval"] == 2  # the fit's
    assert (folder / "test_config.yaml").is_file()
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {s.step for s in events.Scalars("test/acc")} == {4}
    assert {s.step for s in events.Scalars("test/wrong_digit_9_base")} == {4}
    for tag in ("test/mistakes_per_digit", "test/confusion_matrix", "test/confusion_matrix_base"):
        assert [image.step for image in events.Images(tag)] == [4]


def test_validate_prints_each_number_once_adapter_on_beside_off_names_whole(trained_run, fake_mnist, capsys):
    """Lightning prints a metric logged over two dataloaders in both columns, long names cut."""
    root, _ = trained_run
    common = [*config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist)]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["validate", *common, "--trainer.enable_progress_bar", "false", "--ckpt_path", "runs/finetune_lora"])
    out = capsys.readouterr().out
    assert "DataLoader 0" not in out and "…" not in out
    assert "validate of runs/finetune_lora/version_0/checkpoints/last.ckpt (step 4)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("val/")]
    names = [row[0] for row in rows]
    assert len(names) == len(set(names)) and "val/retain/wrong_digit_8" in names and "val/target/acc" in names
    assert not [name for name in names if name.endswith("_base")]  # in the adapter-off column instead
    assert all(len(row) == 3 for row in rows), rows
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["validate", *common, "--trainer.enable_progress_bar", "false", "--ckpt_path", "runs/finetune_lora",
              "--verbose", "false"])  # fmt: skip
    assert "val/target/acc" not in capsys.readouterr().out
    assert [p.name for p in (root / "runs/finetune_lora").iterdir()] == ["version_0"]


def test_inspect_shows_what_a_fine_tune_s_adapter_learned(trained_run, capsys):
    from lightning_lora import adapter_stats

    root, ckpt = trained_run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", "--ckpt", "finetune_lora"])  # a bare run name: runs/finetune_lora
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    model = LitClassifier.load_from_checkpoint(ckpt)
    for stats in adapter_stats(model.net):
        row = next(line.split() for line in out.splitlines() if line.startswith(stats.name + " "))
        assert row[1:3] == ["default", "1"] and float(row[3]) == pytest.approx(stats.delta_norm_ratio, rel=1e-2)
        assert float(row[5].rstrip(",")) == pytest.approx(stats.singular_values[0], rel=1e-2)
    wrong = [
        (["inspect"], "inspect takes -c CONFIG"),
        (["inspect", "--ckpt", str(ckpt), "--lora.rank", "2"], "--base"),
        (["inspect", "--adapter", str(root)], "needs --base"),
    ]
    for args, message in wrong:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_inspect_shows_a_saved_adapter_folder_on_its_base(workdir, fake_mnist, capsys):
    from lightning_lora import adapter_stats, load_adapter
    from lightning_lora.demo.run_loading import build_net, load_base_checkpoint, load_run

    short = ["--data.data_dir", str(fake_mnist), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
             "--trainer.limit_val_batches", "0"]  # fmt: skip
    shutil.rmtree(workdir / "runs/pretrain")  # a real pretraining run instead of workdir's bare weights
    main(["fit", *config_args(["pretrain.yaml"]), *short])
    main(["fit", *config_args(["finetune_lora.yaml"]), *short])
    folder = workdir / "runs/finetune_lora/version_0/adapter"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--adapter", str(folder), "--base", "runs/pretrain"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    net = build_net(load_run("runs/pretrain").hyper_parameters["net"])
    load_base_checkpoint(net, "runs/pretrain")
    for stats in adapter_stats(load_adapter(net, folder)):
        row = next(line.split() for line in out.splitlines() if line.startswith(stats.name + " "))
        assert row[1:3] == ["default", "1"] and float(row[3]) == pytest.approx(stats.delta_norm_ratio, rel=1e-2)
    main(["fit", *config_args(["pretrain.yaml"]), *short, "--seed_everything", "7"])  # another base: version_1
    base = ["--base", "runs/pretrain/version_0"]
    for args, message in [(["--adapter", str(folder)], "needs --base"),
                          (["--adapter", str(folder), "--base", "runs/pretrain/version_1"],
                           "made for another base model: 'linear1.bias' differs (different values). Load the base it "
                           "was trained on (--base: the pretraining run it was trained on)."),
                          (["--adapter", str(workdir), *base], "holds no adapter"),
                          (["--adapter", str(workdir / "nowhere"), *base], "does not exist")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_the_scalars(trained_run):
    root, _ = trained_run
    port = free_port()
    tensorboard = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen(
        [str(tensorboard), "--logdir", str(root / "runs"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    tags = json.load(response)
                if any("val/target/acc" in run_tags for run_tags in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        finetune = {tag for run, run_tags in tags.items() if run.startswith("finetune_lora") for tag in run_tags}
        assert {"val/target/acc", "val/retain/acc_base", "params/trainable", "test/acc"} <= finetune
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_ddp_subprocess_run_keeps_adapters_identical_across_ranks(workdir, fake_mnist):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    env.pop("MASTER_PORT", None)
    command = [
        str(Path(sys.executable).parent / "lightning-lora"),
        "fit",
        *config_args(["finetune_lora.yaml", "ddp.yaml"]),
        "--data.data_dir", str(fake_mnist),
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "1.0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=helpers.RecordAdapters",
        "--trainer.callbacks.out_dir", str(workdir / "ranks"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(workdir / "ranks" / "rank0.pt", weights_only=True)
    rank1 = torch.load(workdir / "ranks" / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and len(rank0) == 6
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert (workdir / "runs/finetune_lora/version_0/adapter/adapter_model.safetensors").is_file()


def test_rerun_into_the_same_log_folder_does_not_fail_on_the_saved_config(workdir, fake_mnist):
    args = ["fit", *config_args(["pretrain.yaml"]), "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "1"]
    args += ["--trainer.logger.init_args.version", "fixed", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--seed_everything", "7"]
    main(args)
    main(args)
    saved = (workdir / "runs/pretrain/fixed/config.yaml").read_text()
    assert "seed_everything: 7" in saved and "lightning_lora.demo.nets.RichBoyNet" in saved


def lora_overlay(tmp_path: Path, **settings) -> str:
    """A config overriding some LoRA settings."""
    import yaml

    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump({"lora": settings}))
    return str(path)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--data.train_digits", "[10]"], 2, "train_digits must be digits 0-9, got [10]"),
        (["--data.train_digits", "[]"], 2, "train_digits is empty"),
        (["--data.train_digits", "[3, 3]"], 2, "train_digits lists [3] more than once"),
        (["--model.base_checkpoint", "nope.ckpt"], 2, "base_checkpoint nope.ckpt does not exist"),
        (["--trainer.max_stepz", "3"], 2, "unrecognized arguments: --trainer.max_stepz"),
        (["--data.data_dir", "nowhere", "--data.download", "false"], 1, "MNIST is not in nowhere/MNIST/raw"),
    ],
)
def test_bad_input_fails_with_one_clear_message(workdir, fake_mnist, capsys, extra, code, message):
    args = ["fit", *config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"rank": 0}, "LoRAConfig.rank must be an integer >= 1, got 0"),
        ({"alpha": -1}, "LoRAConfig.alpha must be a finite number > 0, got -1"),
        ({"dropout": 1.5}, "LoRAConfig.dropout must be a number in [0, 1), got 1.5"),
        ({"init": "xavier"}, "--lora.init: expected one of 'kaiming', 'gaussian', 'pissa', 'olora', got 'xavier'"),
        ({"bias": "some"}, "--lora.bias: expected one of 'none', 'all', 'lora_only', got 'some'"),
        ({"target_modules": ["fc9"]}, "pattern 'fc9' matches no module. Adaptable layers in this model: ['linear1'"),
        ({"target_modules": ["relu"]}, "LoRA target 'relu' is a ReLU, which LoRA cannot adapt"),
        ({"rank": 100_000_000}, "more than the whole model (2,807,010)"),
    ],
)
def test_bad_lora_settings_are_usage_errors(workdir, fake_mnist, capsys, init_args, message):
    args = ["fit", *config_args(["finetune_lora.yaml"]), "-c", lora_overlay(workdir, **init_args)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--data.data_dir", str(fake_mnist), "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_run_with_nothing_to_train_is_a_usage_error(workdir, fake_mnist, capsys, monkeypatch):
    """A net whose every weight is frozen and no adapter injected: the optimizer would get nothing."""
    from lightning_lora.demo.net_module import NetModule

    original = NetModule.configure_optimizers
    monkeypatch.setattr(NetModule, "configure_optimizers", lambda self: original(self.requires_grad_(False)))
    args = ["fit", *config_args(["pretrain.yaml"]), "--data.data_dir", str(fake_mnist), "--trainer.fast_dev_run", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "nothing to train: every parameter is frozen. Add a LoRAInjectionCallback" in capsys.readouterr().err


def test_a_non_finite_loss_is_a_runtime_error(workdir, fake_mnist, capsys):
    args = ["fit", *config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist)]
    args += ["--model.optimizer.init_args.lr", "1e30", "--trainer.max_steps", "30"]
    args += ["--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    assert "the training loss became" in capsys.readouterr().err


def test_a_pretraining_checkpoint_as_ckpt_path_is_a_usage_error(workdir, fake_mnist, capsys):
    data = ["--data.data_dir", str(fake_mnist), "--trainer.enable_progress_bar", "false"]
    main(
        ["fit", *config_args(["pretrain.yaml"]), *data, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(["finetune_lora.yaml"]), *data, "--ckpt_path", "runs/pretrain/version_0"])
    assert exit_info.value.code == 2
    assert "pass them as --model.base_checkpoint instead" in capsys.readouterr().err


@pytest.mark.parametrize("interval", ["0", "-2", "0.0"])
def test_a_validation_interval_of_zero_or_less_is_a_usage_error(workdir, fake_mnist, capsys, interval):
    """Lightning itself divides by it at the first batch (ZeroDivisionError): refused before the run."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist),
              "--trainer.val_check_interval", interval])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "val_check_interval must be > 0" in err and "limit_val_batches 0" in err


@pytest.mark.parametrize("verb", ["fit", "test", "predict"])
def test_a_failed_run_leaves_no_empty_version_folder(workdir, fake_mnist, capsys, verb):
    """A run that fails before it trained or saved anything (here: a pretraining checkpoint given as the
    fine-tune's --ckpt_path, and a target that matches nothing) leaves nothing under runs/<name>/."""
    data = ["--data.data_dir", str(fake_mnist), "--trainer.enable_progress_bar", "false"]
    main(
        ["fit", *config_args(["pretrain.yaml"]), *data, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"]
    )
    for extra in (["--ckpt_path", "runs/pretrain/version_0"], ["--lora.target_modules", "[no_such_layer]"]):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, *config_args(["finetune_lora.yaml"]), *data, *extra])
        assert exit_info.value.code == 2, capsys.readouterr().err
        runs = workdir / "runs/finetune_lora"
        assert not runs.exists() or not any(runs.iterdir()), sorted(p.name for p in runs.iterdir())


def test_the_command_line_base_checkpoint_wins_and_a_stored_class_never_switches_the_model(workdir, fake_mnist, capsys):
    common = [*config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist)]
    common += ["--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--trainer.max_steps", "2"])
    ckpt = workdir / "runs/finetune_lora/version_0/checkpoints/last.ckpt"
    moved = workdir / "elsewhere" / "pretrain.ckpt"
    moved.parent.mkdir()
    (workdir / "runs/pretrain/checkpoints/last.ckpt").rename(moved)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "lightning_lora.demo.classifiers.LitRegressor"
    torch.save(checkpoint, ckpt)
    with pytest.raises(SystemExit) as exit_info:  # the config still names the old place: a clear error
        main(["test", *common, "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2 and "base_checkpoint runs/pretrain is a folder without checkpoints" in (
        capsys.readouterr().err
    )
    main(["test", *common, "--ckpt_path", str(ckpt), "--model.base_checkpoint", str(moved)])
    assert "test/acc" in capsys.readouterr().out  # ran as a LitClassifier (a LitRegressor logs no test/acc)


def test_a_resume_with_other_data_order_settings_is_refused_once_writing_nothing(workdir, fake_mnist, capsys, caplog):
    """Batch size and data seed decide the order: refused naming both values, before Lightning restores
    anything (no new version folder); a new seed_everything is named; --new_data_order restarts the order;
    the progress lines show the true position and totals after the resume."""
    from lightning_lora.integration.line_progress import LineProgress

    common = [*config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist), "--data.train_digits",
              "null", "--trainer.val_check_interval", "1.0"]  # fmt: skip
    caplog.set_level(logging.INFO)
    main(["fit", *common, "--trainer.max_steps", "3"])
    runs = workdir / "runs/finetune_lora"
    capsys.readouterr()
    resume = ["fit", *common, "--trainer.max_steps", "5", "--ckpt_path", "runs/finetune_lora"]
    for extra, named in (
        (["--data.batch_size", "20"], "data.batch_size: 10 in the checkpoint, 20 now"),
        (["--data.seed", "5"], "data.seed: 42 in the checkpoint, 5 now"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*resume, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and named in err and err.count("resume refused") == 1, err
        assert sorted(p.name for p in runs.iterdir()) == ["version_0"], "a refused resume left a run folder"
    LineProgress.default_every_seconds, before = 0.0, LineProgress.default_every_seconds
    try:
        main([*resume, "--seed_everything", "9"])
    finally:
        LineProgress.default_every_seconds = before
    captured = capsys.readouterr()
    output = captured.out + captured.err + caplog.text
    assert "resuming with the interrupted run's seed 42, not seed_everything 9" in output
    lines = [line.split(",")[0] for line in captured.err.splitlines() if line.startswith("epoch 0:")]
    assert lines[:2] == ["epoch 0: 4/36 batches training", "epoch 0: 5/36 batches training"], lines
    main([*resume, "--data.batch_size", "20", "--new_data_order", "true", "--trainer.max_steps", "4"])
    assert "the data order restarts" in capsys.readouterr().err + caplog.text


def test_short_class_names_help_and_lora_options_are_discoverable(capsys):
    for args, expected in (
        (["fit", "--data.help", "MNISTDataModule"], "--data.eval_batch_size"),
        (["fit", "--model.help", "LitClassifier"], "--model.distill_weight"),
        (["fit", "--help"], "--lora.rank, --lora.alpha"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0 and expected in capsys.readouterr().out, args
    with pytest.raises(SystemExit):
        main(["fit", *config_args(["finetune_lora.yaml"]), "--lora.rank", "4", "--data.train_digits", "7",
              "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lora"]["init_args"]["rank"] == 4 and printed["data"]["init_args"]["train_digits"] == 7


def test_a_run_prints_no_known_benign_warning_and_no_advertising(workdir, fake_mnist):
    """benign_warnings silences exactly its list; what it lists must not reach a user's terminal."""
    from lightning_lora.integration import benign_warnings

    env = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning shown once, as a user's terminal would
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lightning-lora"), "fit", *config_args(["finetune_lora.yaml"]),
         "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1.0",
         "--trainer.enable_progress_bar", "false"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    for benign in (*benign_warnings.WARNINGS, *benign_warnings.NOTICES):
        assert not re.search(benign.message, output), benign.message
    assert "Warning" not in output, output[-3000:]


def test_output_that_is_not_a_terminal_gets_progress_lines(workdir, fake_mnist, capsys, monkeypatch):
    """A redrawn progress bar shows nothing in a log file until the epoch ends: plain lines instead."""
    from lightning_lora.integration.line_progress import LineProgress

    monkeypatch.setattr(LineProgress, "default_every_seconds", 0.0)  # a line after every batch
    main(["fit", "-c", str(CONFIGS / "pretrain.yaml"), "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "3"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 0:")]
    assert [line.split(",")[0] for line in lines] == [
        "epoch 0: 1/36 batches training",
        "epoch 0: 2/36 batches training",
        "epoch 0: 3/36 batches training",
        "epoch 0: 3/36 batches done",
    ]


def test_a_run_resumed_at_an_epochs_end_prints_no_line_for_the_epoch_it_only_closes(workdir, fake_mnist, capsys,
                                                                                      monkeypatch):  # fmt: skip
    from lightning_lora.integration.line_progress import LineProgress

    monkeypatch.setattr(LineProgress, "default_every_seconds", 0.0)
    args = ["fit", "-c", str(CONFIGS / "pretrain.yaml"), "--data.data_dir", str(fake_mnist),
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval",
            "1.0", "--trainer.logger.init_args.name", "lines", "--trainer.max_epochs", "5"]  # fmt: skip
    main([*args, "--trainer.max_steps", "3"])
    capsys.readouterr()
    main([*args, "--trainer.max_steps", "5", "--ckpt_path", "runs/lines"])
    lines = [line.split(",")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert lines == ["epoch 1: 1/3 batches training", "epoch 1: 2/3 batches training", "epoch 1: 2/3 batches done"]


def test_a_sigterm_report_names_accumulation_and_the_checkpoint_a_resumed_run_came_from(tmp_path):
    """A SIGTERM inside an accumulated step saves nothing: the report says why and what to resume instead."""
    from types import SimpleNamespace

    from lightning_lora.integration import lora_cli

    trainer = SimpleNamespace(global_step=7, checkpoint_callbacks=[], accumulate_grad_batches=4,
                              ckpt_path=str(tmp_path / "step=4.ckpt"))  # fmt: skip
    lora_cli._RUN.update(trainer=trainer, started=0.0)
    try:
        report = lora_cli.sigterm_report()
    finally:
        lora_cli._RUN.clear()
    assert "optimizer step of 4 accumulated batches" in report
    assert f"resume again with --ckpt_path {tmp_path / 'step=4.ckpt'}" in report


def test_a_bare_run_name_means_that_run_under_runs(tmp_path, monkeypatch):
    """`report --finetuned finetune_lora` (the logger's name, without runs/) was not understood."""
    from lightning_lora.integration.checkpoint_reader import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    last = tmp_path / "runs/finetune_lora/version_0/checkpoints/last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    assert resolve_checkpoint("finetune_lora").resolve() == last.resolve()
    with pytest.raises(FileNotFoundError, match="no run of that name in runs/ either"):
        resolve_checkpoint("pretrain")


def test_a_changed_learning_rate_on_resume_is_named_not_dropped_silently(workdir, fake_mnist, capsys, caplog):
    caplog.set_level(logging.INFO)
    fit = ["fit", *config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist),
           "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "1.0"]  # fmt: skip
    main([*fit, "--trainer.max_steps", "2"])
    main(
        [
            *fit,
            "--trainer.max_steps",
            "3",
            "--ckpt_path",
            "runs/finetune_lora",
            "--model.optimizer.init_args.lr",
            "0.01",
        ]
    )
    captured = capsys.readouterr()
    assert "resuming with the checkpoint's learning rate 0.001, not the configured 0.01" in captured.err + caplog.text
    caplog.clear()
    main([*fit, "--trainer.max_steps", "4", "--ckpt_path", "runs/finetune_lora"])
    said = capsys.readouterr().err + caplog.text
    assert "learning rate" not in said and "optimizer settings" not in said  # the same settings: nothing to say
    caplog.clear()
    decay = ["--model.optimizer.init_args.weight_decay", "0.5"]
    main([*fit, "--trainer.max_steps", "5", "--ckpt_path", "runs/finetune_lora", *decay])
    assert (
        "the checkpoint's optimizer settings weight_decay 0.0 (configured: 0.5)"
        in capsys.readouterr().err + caplog.text
    )


def test_a_changed_distillation_weight_on_resume_is_refused_naming_both_values(workdir, fake_mnist, capsys):
    fit = ["fit", *config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist),
           "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "1.0"]  # fmt: skip
    main([*fit, "--trainer.max_steps", "2", "--model.distill_weight", "1", "--model.distill_on", "all"])
    with pytest.raises(SystemExit) as exit_info:
        main([*fit, "--trainer.max_steps", "3", "--ckpt_path", "runs/finetune_lora", "--model.distill_weight", "2",
              "--model.distill_on", "all"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "model.distill_weight: 1.0 in the checkpoint, 2.0 now" in capsys.readouterr().err


def test_a_refused_test_or_validate_leaves_the_run_s_folder_as_it_was(trained_run, fake_mnist, monkeypatch, capsys):
    """They log into the run's own folder: a refusal must not leave an empty event file or a config copy there."""
    root, _ = trained_run
    monkeypatch.chdir(root)
    folder = root / "runs/finetune_lora/version_0"
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    common = [*config_args(["finetune_lora.yaml"]), "--data.data_dir", str(fake_mnist)]
    for verb in ("test", "validate"):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, *common, "--lora.rank", "8", "--ckpt_path", "runs/finetune_lora"])
        assert exit_info.value.code == 2 and "rank 1 in the checkpoint, 8 now" in capsys.readouterr().err
        assert {p.name: p.stat().st_size for p in folder.iterdir()} == before


def test_python_dash_m_runs_the_command_as_the_console_script_does():
    result = subprocess.run([sys.executable, "-m", "lightning_lora.cli", "--version"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("lightning-lora ")
