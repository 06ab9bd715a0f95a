"""Untrusted files: nothing in a checkpoint, a stored config or a merged file chooses the code that runs.

Every loading path is fed a crafted pickle, a real checkpoint with every string poisoned to name
an importable module whose import leaves a mark, and merged files with poisoned entries. Nothing
may run, and every refusal is a clear message.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_lora import LitClassifier, load_merged
from lightning_lora.checkpoint_files import load_run
from lightning_lora.cli import main
from lightning_lora.merged import METADATA_KEY
from lightning_lora.trust import UntrustedClassError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "finetune_lora.yaml")
EVIL = "evil_payload.Evil"


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module ``evil_payload`` whose import writes a marker file: proof that code ran."""
    marker = tmp_path / "code_ran"
    package = tmp_path / "importable"
    package.mkdir()
    (package / "evil_payload.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\nclass Evil:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "evil_payload", raising=False)
    return marker


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def poison_strings(value, replacement: str):
    """Every string in a nested structure replaced (keys of the state dict kept, so it still loads)."""
    if isinstance(value, str):
        return replacement
    if isinstance(value, dict):
        return {k: poison_strings(v, replacement) for k, v in value.items()}
    if isinstance(value, list):
        return [poison_strings(v, replacement) for v in value]
    if isinstance(value, tuple):
        return tuple(poison_strings(v, replacement) for v in value)
    return value


def loading_paths(root: Path, checkpoint: Path, fake_mnist, out: Path):
    """Every way this package reads a checkpoint: CLI verbs, LightningCLI, and the Python API."""
    data = ["--data.data_dir", str(fake_mnist), "--trainer.enable_progress_bar", "false"]
    return {
        "export": lambda: main(["export", "--ckpt", str(checkpoint), "--out", str(out / "adapter")]),
        "merge": lambda: main(["merge", "--ckpt", str(checkpoint), "--out", str(out / "merged.safetensors")]),
        "report": lambda: main(["report", "--finetuned", str(checkpoint), "--out", str(out / "report")]),
        "test --ckpt_path": lambda: main(["test", "-c", CONFIG, *data, "--ckpt_path", str(checkpoint)]),
        "fit --ckpt_path": lambda: main(
            ["fit", "-c", CONFIG, *data, "--ckpt_path", str(checkpoint), "--trainer.max_steps", "3"]
        ),  # fmt: skip
        "base_checkpoint": lambda: main(["fit", "-c", CONFIG, *data, "--model.base_checkpoint", str(checkpoint)]),
        "load_from_checkpoint": lambda: LitClassifier.load_from_checkpoint(checkpoint),
        "load_run": lambda: load_run(checkpoint),
    }


def attempt(action) -> BaseException | None:
    try:
        action()
    except (SystemExit, Exception) as err:  # every path must refuse; which way is checked by the callers
        return err
    return None


def test_a_crafted_pickle_is_refused_on_every_loading_path(lora_run, tmp_path, monkeypatch, fake_mnist, capsys):
    root, _ = lora_run
    monkeypatch.chdir(root)
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Exploit(marker)}))
    for name, action in loading_paths(root, evil, fake_mnist, tmp_path).items():
        error = attempt(action)
        assert error is not None, name
        if isinstance(error, SystemExit):
            assert error.code in (1, 2), name
            assert "not a readable checkpoint" in capsys.readouterr().err, name
        else:
            assert "not a readable checkpoint" in str(error), name
    assert not marker.exists()


def test_every_string_of_a_real_checkpoint_poisoned_runs_nothing(
    lora_run, tmp_path, monkeypatch, fake_mnist, evil_module
):
    root, good = lora_run
    monkeypatch.chdir(root)
    checkpoint = torch.load(good, weights_only=True)
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(poison_strings(checkpoint, EVIL), poisoned)
    for name, action in loading_paths(root, poisoned, fake_mnist, tmp_path).items():
        attempt(action)
        assert not evil_module.exists(), f"{name} imported a class named by the file"
        assert "evil_payload" not in sys.modules, name


@pytest.mark.parametrize(
    "where",
    [("hyper_parameters", "net", "class_path"), ("lightning_lora_module",), ("hyper_parameters", "_class_path")],
)
def test_each_class_path_field_is_checked_before_any_import(lora_run, tmp_path, monkeypatch, evil_module, where):
    root, good = lora_run
    monkeypatch.chdir(root)
    checkpoint = torch.load(good, weights_only=True)
    holder = checkpoint
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = EVIL
    if where[-1] == "_class_path":
        checkpoint["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(checkpoint, poisoned)
    for action in (lambda: load_run(poisoned), lambda: LitClassifier.load_from_checkpoint(poisoned)):
        with pytest.raises(UntrustedClassError, match=f"names the class '{EVIL}'.*nothing was imported.*--allow-class"):
            action()
    assert not evil_module.exists()


def test_a_users_own_class_loads_once_allowed(lora_run, tmp_path, monkeypatch):
    """The allowlist is not a wall: a class the user names is trusted (here, a subclass of RichBoyNet)."""
    root, good = lora_run
    monkeypatch.chdir(root)
    (tmp_path / "my_nets.py").write_text(
        "from lightning_lora.models import RichBoyNet\nclass MyNet(RichBoyNet):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"]["net"]["class_path"] = "my_nets.MyNet"
    torch.save(checkpoint, tmp_path / "mine.ckpt")
    with pytest.raises(UntrustedClassError):
        load_run(tmp_path / "mine.ckpt")
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--ckpt",
                str(tmp_path / "mine.ckpt"),
                "--out",
                str(tmp_path / "a"),
                "--allow-class",
                "my_nets.MyNet",
            ]
        )
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


@pytest.fixture
def merged_file(lora_run, tmp_path, monkeypatch):
    root, good = lora_run
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit):
        main(["merge", "--ckpt", str(good), "--out", str(tmp_path / "merged.safetensors")])
    return tmp_path / "merged.safetensors"


def rewrite_metadata(path: Path, change) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    meta = json.loads(metadata[METADATA_KEY])
    change(meta)
    save_file(load_file(path), path, {**metadata, METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize("poison", ["every string", "the class path"])
def test_a_poisoned_merged_file_runs_nothing(merged_file, lora_run, tmp_path, evil_module, capsys, poison):
    if poison == "every string":
        rewrite_metadata(merged_file, lambda meta: meta.update(poison_strings(meta, EVIL)))
    else:
        rewrite_metadata(merged_file, lambda meta: meta["net"].update(class_path=EVIL))
        with pytest.raises(UntrustedClassError, match="nothing was imported"):
            load_merged(merged_file)
    with pytest.raises((UntrustedClassError, ValueError)):
        load_merged(merged_file)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--finetuned", str(lora_run[1]), "--merged", str(merged_file), "--out", str(tmp_path / "r")])
    assert exit_info.value.code in (1, 2) and "Traceback" not in capsys.readouterr().err
    assert not evil_module.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a valid safetensors file"),
        (lambda p: p.write_bytes(pickle.dumps({"x": 1})), "not a valid safetensors file"),
        (lambda p: save_file({"x": torch.zeros(2)}, p), "not a merged model"),
        (lambda p: rewrite_metadata(p, lambda m: m.update(format_version=99)), "upgrade lightning-lora"),
        (lambda p: rewrite_metadata(p, lambda m: m["net"]["init_args"].update(hidden_size_1=7)), "do not fit"),
    ],
)
def test_a_damaged_merged_file_is_refused_clearly(merged_file, damage, message):
    damage(merged_file)
    with pytest.raises(ValueError, match=message):
        load_merged(merged_file)
