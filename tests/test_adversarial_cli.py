"""No traceback from the command line, ever: every failure is one paragraph naming the value and the fix."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_base_checkpoint

from lightning_lora.cli import main
from lightning_lora.demo.nets import MLP

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FINETUNE = str(CONFIGS / "finetune_lora.yaml")


@pytest.fixture
def here(lora_run, monkeypatch):
    root, checkpoint = lora_run
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    return root, checkpoint


def fails(args: list[str], capsys, code: int) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err and err.startswith("lightning-lora") and err.count("\n") <= 2, err
    return err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["fit", "-c", FINETUNE, "--model.net.class_path", "lightning_lora.demo.nets.RichBoyNt"], 2, "RichBoyNt"),
        (["fit", "-c", FINETUNE, "--model.net.init_args.hiden", "3"], 2, "hiden"),
        (["fit", "-c", FINETUNE, "--data.batch_size", "ten"], 2, "--data.batch_size: expected"),
        (["fit", "-c", FINETUNE, "--lora.alpha", "big"], 2, "--lora.alpha: expected a float, got 'big'"),
        (["fit", "-c", FINETUNE, "--trainer.max_stepz", "3"], 2, "unrecognized arguments: --trainer.max_stepz"),
        (["fit", "-c", "missing.yaml"], 2, "missing.yaml"),
        (["test", "-c", FINETUNE, "--ckpt_path", "nowhere.ckpt"], 2, "ckpt_path nowhere.ckpt does not exist"),
        (["inspect", "-c", FINETUNE, "--lora.rnak", "3"], 2, "unrecognised option '--lora.rnak'"),
        (["export", "--ckpt", "runs/finetune_lora"], 2, "the following arguments are required: --out"),
        (["frobnicate"], 2, "unknown command 'frobnicate'"),
        (
            ["fit", "-c", FINETUNE, "--model.init_args.bogus", "3"],
            2,
            "LitClassifier has no option 'bogus'; see --model",
        ),
        (["fit", "-c", FINETUNE, "--model.optimizer.init_args.lr", "abc"], 2, "lr: expected a float, got 'abc'"),
        (["fit", "-c", FINETUNE, "--trainer.precision", "17"], 2, "expected one of 64, 32, 16, 'transformer-engine'"),
        (["fit", "-c", FINETUNE, "--data.class_path", "Nope"], 2, "'Nope' is not a class; give a dotted import path"),
        (["inspect", "-c", FINETUNE, "--lora.rank", "100000000"], 2, "more than the whole model"),
        (["inspect", "-c", FINETUNE, "--lora.target_modules", "[nothing]"], 2, "'nothing' matches no module"),
        (["inspect", "-c", FINETUNE, "--lora.alpha", ""], 2, "--lora.alpha needs a value, got ''"),
        (["inspect", "-c", FINETUNE, "--lora.alpha=", "--lora.rank", "4"], 2, "--lora.alpha needs a value"),
        (["inspect", "-c", FINETUNE, "--lora.target_modules", "linear1"], 2, "(e.g. [linear1]) or 'all-linear'"),
        (["fit", "-c", FINETUNE, "--lora", ""], 2, "--lora: needs a value (an empty string was given)"),
        (["fit", "--model.help", "Bogus"], 2, "error: 'Bogus' is not a class; give a dotted import path"),
        (["fit", "-c", FINETUNE, "--model.net", "MLP"], 2, "the short name 'MLP' could mean torchvision.ops.MLP"),
        (["fit", "-c", FINETUNE, "--model", "torch.nn.Linear"], 2, "does not correspond to a subclass of LightningMod"),
        (
            ["fit", "-c", FINETUNE, "--model", "nopkg.Module"],
            2,
            "cannot import 'nopkg.Module' (no module named 'nopkg')",
        ),
    ],
)
def test_usage_errors(here, capsys, args, code, message):
    assert message in fails(args, capsys, code)


def test_an_optimizer_setting_torch_refuses_is_named(here, fake_mnist, capsys):
    args = ["fit", "-c", FINETUNE, "--data.data_dir", str(fake_mnist), "--model.optimizer.init_args.lr", "-1"]
    assert "model.optimizer: Invalid learning rate: -1.0" in fails(args, capsys, 2)


def test_a_class_path_typo_in_a_yaml_names_the_class(here, tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    net:\n      class_path: lightning_lora.demo.nets.RichBoyNett\n")
    err = fails(["fit", "-c", FINETUNE, "-c", str(typo)], capsys, 2)
    assert "--model.net.class_path: lightning_lora.demo.nets.RichBoyNett does not exist" in err
    assert "NestedArg" not in err and "Given value" not in err


def test_a_malformed_yaml_config(here, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "is not valid YAML" in fails(["inspect", "-c", str(bad)], capsys, 2)
    assert "bad.yaml" in fails(["fit", "-c", str(bad)], capsys, 2)


def test_a_config_that_is_not_utf8_is_named(here, tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: {}\n# caf\xe9\n".encode("latin-1"))
    for verb in ("fit", "inspect"):
        err = fails([verb, "-c", str(bad)], capsys, 2)
        assert "latin1.yaml cannot be read as UTF-8" in err, err


def test_a_truncated_checkpoint_everywhere(here, tmp_path, capsys, fake_mnist):
    _, checkpoint = here
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    test = ["test", "-c", FINETUNE, "--data.data_dir", str(fake_mnist), "--ckpt_path", str(truncated)]
    assert "not a readable checkpoint" in fails(test, capsys, 1)  # a damaged file: a failure, not a usage error
    assert "not a readable checkpoint" in fails(["export", "--ckpt", str(truncated), "--out", "x"], capsys, 1)


def test_ckpt_path_last_means_the_latest_run_of_this_config(here, tmp_path, capsys, fake_mnist):
    args = ["test", "-c", FINETUNE, "--data.data_dir", str(fake_mnist), "--ckpt_path", "last"]
    main(args)
    assert "test/acc" in capsys.readouterr().out
    other = ["--trainer.logger.init_args.name", "never_ran"]
    assert "no earlier run of this config" in fails([*args, *other], capsys, 2)


def test_an_unexpected_error_says_it_is_a_bug_and_how_to_see_more(here, capsys, monkeypatch):
    def broken(argv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("lightning_lora.cli.file_verbs.export_command", broken)
    err = fails(["export", "--ckpt", "x", "--out", "y"], capsys, 1)
    assert "unexpected ZeroDivisionError: division by zero" in err and "LIGHTNING_LORA_TRACEBACK=1" in err
    monkeypatch.setenv("LIGHTNING_LORA_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["export", "--ckpt", "x", "--out", "y"])


def test_help_lists_every_command_and_version_works(capsys):
    for flag in ("--help", "-h", None):
        with pytest.raises(SystemExit) as exit_info:
            main([flag] if flag else [])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for verb in ("fit", "validate", "test", "predict", "inspect", "export", "merge", "report"):
            assert f"\n  {verb} " in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("lightning-lora 0.")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "-c", FINETUNE]], ids=" ".join)
def test_commands_that_train_nothing_never_import_lightning(args):
    """What keeps --help, --version and inspect fast (benchmarks/startup.py measures it): no Lightning import."""
    code = (
        "import sys\nfrom lightning_lora.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('lightning.pytorch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr


MADE_BY_MAKE = os.environ.get("LIGHTNING_LORA_REQUIRE_EXTRAS") == "1"


@pytest.mark.skipif(not MADE_BY_MAKE, reason="checks the venv `make test` sets up; run it with make test")
def test_the_runs_of_make_s_venv_never_import_transformers():
    """torchmetrics imports transformers at every `import lightning` when it is installed (~0.7 s): make keeps the
    test extra in a folder only the tests put on PYTHONPATH, so `make demo` or `lightning-lora fit` loads none."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = "import sys, lightning.pytorch, lightning_lora.demo.classifiers\nprint('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr
    assert importlib.util.find_spec("transformers") is not None  # while the tests themselves do see it


def test_a_checkpoint_of_another_network_is_named_not_a_traceback(here, capsys, fake_mnist):
    """A fine-tune checkpoint of RichBoyNet, tested or reported with the MLP config's network."""
    root, checkpoint = here
    write_base_checkpoint(root / "mlp_base.ckpt", MLP())
    mlp = ["-c", str(CONFIGS / "mlp_finetune_lora.yaml"), "--model.base_checkpoint", "mlp_base.ckpt"]
    data = ["--data.data_dir", str(fake_mnist)]
    err = fails(["test", *mlp, *data, "--ckpt_path", str(checkpoint)], capsys, 2)
    assert "rank 1 in the checkpoint, 4 now" in err and "alpha 1.0 in the checkpoint, 8.0 now" in err
    same_lora = ["--lora.rank", "1", "--lora.alpha", "1"]
    err = fails(["test", *mlp, *data, *same_lora, "--ckpt_path", str(checkpoint)], capsys, 2)
    assert "not the one the checkpoint's adapters were trained on" in err and "--model.base_checkpoint" in err


def test_a_run_folder_says_which_checkpoint_it_means_and_what_it_skipped(here, capsys):
    root, checkpoint = here
    killed = root / "runs/finetune_lora/version_7"  # a run killed before its first checkpoint
    killed.mkdir()
    try:
        with pytest.raises(SystemExit):
            main(["export", "--ckpt", "runs/finetune_lora", "--out", "skipped"])
    finally:
        killed.rmdir()
    out = capsys.readouterr().out
    assert "runs/finetune_lora means its newest checkpoint, runs/finetune_lora/version_0/checkpoints/last.ckpt" in out
    newer = out.split("the newer run folders ")[1].split(" hold no checkpoint")[0]
    assert "version_7" in newer.split(", ")
