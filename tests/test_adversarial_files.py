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
from lightning_lora.cli import main
from lightning_lora.demo.merged_model import METADATA_KEY
from lightning_lora.demo.run_loading import load_run
from lightning_lora.integration.class_allowlist import UntrustedClassError

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
    "change",
    [
        lambda hp: hp.update(optimizer=EVIL),  # a new field, typed as a callable in the module's signature
        lambda hp: hp.update(net=EVIL),  # the net as a bare string, no class_path key
        lambda hp: hp.update(extra={"deep": [1, {"x": EVIL}]}),
        lambda hp: hp.update(net=f"class_path: {EVIL}"),  # jsonargparse parses strings as YAML
        lambda hp: hp.update(net=f"{{class_path: {EVIL}}}"),
        lambda hp: hp.update(optimizer=f'{{"class_path": "{EVIL}"}}'),
    ],
)
def test_a_dotted_string_anywhere_in_the_stored_settings_imports_nothing(
    lora_run, tmp_path, monkeypatch, fake_mnist, evil_module, change
):
    root, good = lora_run
    monkeypatch.chdir(root)
    checkpoint = torch.load(good, weights_only=True)
    change(checkpoint["hyper_parameters"])
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(checkpoint, poisoned)
    for name, action in loading_paths(root, poisoned, fake_mnist, tmp_path).items():
        attempt(action)
        assert not evil_module.exists(), f"{name} imported a module named by the file"
        assert "evil_payload" not in sys.modules, name
    attempt(lambda: LitClassifier.load_from_checkpoint(poisoned))  # refused, or built from its own arguments only
    assert not evil_module.exists() and "evil_payload" not in sys.modules
    from lightning_lora import LoRACheckpointMixin

    with pytest.raises(UntrustedClassError, match="nothing was imported"):  # any module with the mixin
        LoRACheckpointMixin.load_from_checkpoint.__func__(LitClassifier.__mro__[2], poisoned)


def test_a_huge_rank_in_a_checkpoint_is_refused_before_allocating(lora_run, tmp_path, monkeypatch, capsys):
    from lightning_lora.core.layers.base import LoRALayer

    root, good = lora_run
    monkeypatch.chdir(root)
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["lightning_lora"]["lora_config"]["rank"] = 4_000_000
    huge = tmp_path / "huge.ckpt"
    torch.save(checkpoint, huge)
    monkeypatch.setattr(LoRALayer, "__init__", lambda *a, **k: pytest.fail("allocated before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(huge), "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "would allocate about" in capsys.readouterr().err
    with pytest.raises(ValueError, match="more than the whole model"):
        LitClassifier.load_from_checkpoint(huge)


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
        "from lightning_lora.demo.nets import RichBoyNet\nclass MyNet(RichBoyNet):\n    pass\n"
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
        (lambda p: rewrite_metadata(p, lambda m: m["net"]["init_args"].update(hidden_size_1=7)), "does not fit"),
    ],
)
def test_a_damaged_merged_file_is_refused_clearly(merged_file, damage, message):
    damage(merged_file)
    with pytest.raises(ValueError, match=message):
        load_merged(merged_file)


def test_a_checkpoint_tampered_with_nan_is_refused_on_every_loading_path(lora_run, tmp_path, monkeypatch, fake_mnist):
    root, good = lora_run
    monkeypatch.chdir(root)
    checkpoint = torch.load(good, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("lora_B"))
    checkpoint["state_dict"][key][0, 0] = float("nan")
    tampered = tmp_path / "nan.ckpt"
    torch.save(checkpoint, tampered)
    paths = loading_paths(root, tampered, fake_mnist, tmp_path)
    for name in (
        "export",
        "merge",
        "report",
        "test --ckpt_path",
        "fit --ckpt_path",
        "load_from_checkpoint",
        "load_run",
    ):
        error = attempt(paths[name])
        assert error is not None, f"{name} accepted a NaN adapter"
        if not isinstance(error, SystemExit):
            assert "NaN or infinite" in str(error), name
    assert not (tmp_path / "merged.safetensors").exists() and not (tmp_path / "adapter").exists()


def test_huge_network_sizes_in_a_file_are_refused_before_allocating(lora_run, merged_file, tmp_path, monkeypatch):
    root, good = lora_run
    monkeypatch.chdir(root)
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"]["net"]["init_args"]["hidden_size_1"] = 10**9
    huge = tmp_path / "huge_net.ckpt"
    torch.save(checkpoint, huge)
    rewrite_metadata(merged_file, lambda m: m["net"]["init_args"].update(hidden_size_1=10**9))
    real_init = torch.nn.Linear.__init__

    def guarded(self, in_features, out_features, *args, **kwargs):
        if in_features * out_features > 10**8 and kwargs.get("device") != torch.device("meta"):
            if torch.empty(0).device.type != "meta":
                pytest.fail("allocated a huge layer before refusing")
        real_init(self, in_features, out_features, *args, **kwargs)

    # A full checkpoint (not adapter-only: the base's weights inside), a plain net's or a fine-tune's, whose
    # names may differ from the net's (a modules_to_save copy): its own tensors are what the net must fit.
    spec = {"class_path": "lightning_lora.demo.nets.MLP", "init_args": {"hidden_sizes": [10**6, 10**6]}}
    full = {"pytorch-lightning_version": "2.6.6", "global_step": 1, "hyper_parameters": {"net": spec}}
    plain = torch.nn.Linear(8, 8)
    small, renamed = tmp_path / "full_small.ckpt", tmp_path / "full_renamed.ckpt"
    torch.save({**full, "state_dict": {f"net.layers.{i}.weight": plain.weight for i in (0, 2, 4)}}, small)
    torch.save({**full, "state_dict": {"net.other.weight": plain.weight}}, renamed)
    monkeypatch.setattr(torch.nn.Linear, "__init__", guarded)
    for action in (lambda: load_run(huge), lambda: LitClassifier.load_from_checkpoint(huge)):
        with pytest.raises(ValueError, match="does not fit its weights"):
            action()
    with pytest.raises(ValueError, match=r"does not fit its weights: shape mismatches layers\.0\.weight"):
        load_run(small)
    with pytest.raises(
        ValueError, match="does not fit its weights: it has 1,000,796,000,010 weights, the file holds 64"
    ):
        load_run(renamed)
    with pytest.raises(ValueError, match="does not fit its weights"):
        load_merged(merged_file)


def test_checkpoints_load_from_file_objects_and_urls_and_deep_nesting_is_refused(lora_run, tmp_path, monkeypatch):
    import io

    root, good = lora_run
    monkeypatch.chdir(root)
    expected = load_run(good).net.state_dict()
    for source in (io.BytesIO(good.read_bytes()), f"file://{good}"):
        model = LitClassifier.load_from_checkpoint(source)
        assert all(torch.equal(model.net.state_dict()[k], v) for k, v in expected.items())
    deep: dict = {}
    cursor = deep
    for _ in range(5000):
        cursor["x"] = {}
        cursor = cursor["x"]
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"]["extra"] = deep
    nested = tmp_path / "nested.ckpt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # a crafted file: its writer had a deeper stack than readers get
    try:
        torch.save(checkpoint, nested)
    finally:
        sys.setrecursionlimit(limit)
    for action in (lambda: load_run(nested), lambda: LitClassifier.load_from_checkpoint(nested)):
        with pytest.raises(
            ValueError, match="nested more than 64 levels deep|nested too deeply|not a readable checkpoint"
        ):
            action()
