"""Model surgery: targets, injection, freezing, merge/unload, disable, state dicts, adapter files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from lightning_lora import (
    LoRAConfig,
    LoRALinear,
    ModuleToSave,
    count_parameters,
    disable_lora,
    find_targets,
    get_lora_config,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lightning_lora.inject import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, matches


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def train(model: nn.Module, steps: int = 5) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(32, 6)).pow(2).mean().backward()
        opt.step()


X = torch.randn(10, 6)


class TestMatching:
    @pytest.mark.parametrize(
        ("name", "pattern", "expected"),
        [
            ("net.fc1", "net.fc1", True),
            ("net.fc1", "fc1", True),
            ("net.xfc1", "fc1", False),
            ("net.layers.0", "layers.*", True),
            ("layers.0", "layers.*", True),
            ("net.layers0", "layers.*", False),
            ("encoder.2", "encoder.[02]", True),
        ],
    )
    def test_exact_suffix_and_glob(self, name, pattern, expected):
        assert matches(name, pattern) is expected

    def test_all_linear_and_exclude(self):
        model = tiny()
        assert set(find_targets(model, LoRAConfig())) == {"encoder.0", "encoder.2", "head"}
        config = LoRAConfig(target_modules=["encoder.*"], exclude_modules=["encoder.0"])
        assert set(find_targets(model, config)) == {"encoder.2"}  # the glob sweeps over the ReLU


class TestTargetErrors:
    def test_pattern_matching_nothing_lists_the_linear_layers(self):
        with pytest.raises(ValueError, match=r"pattern 'fc9' matches no module.*\['encoder.0', 'encoder.2', 'head'\]"):
            inject_lora(tiny(), LoRAConfig(target_modules=["fc9"]))

    def test_exclude_matching_nothing_is_an_error_too(self):
        with pytest.raises(ValueError, match="exclude_modules pattern 'nope' matches no module"):
            inject_lora(tiny(), LoRAConfig(exclude_modules=["nope"]))

    def test_non_linear_target_is_named_with_its_type(self):
        with pytest.raises(ValueError, match="LoRA target 'encoder.1' is a ReLU, not an nn.Linear"):
            inject_lora(tiny(), LoRAConfig(target_modules=["encoder.1"]))
        with pytest.raises(ValueError, match="'encoder' is a Sequential"):
            inject_lora(tiny(), LoRAConfig(target_modules=["encoder"]))
        conv = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Linear(2, 2))
        with pytest.raises(ValueError, match="'0' is a Conv1d"):
            inject_lora(conv, LoRAConfig(target_modules=["*"]))

    def test_everything_excluded(self):
        with pytest.raises(ValueError, match="selects no nn.Linear to adapt"):
            inject_lora(tiny(), LoRAConfig(target_modules=["head"], exclude_modules=["head"]))

    def test_multihead_attention_out_proj_is_refused_not_silently_adapted(self):
        model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
        with pytest.raises(ValueError, match="'0.out_proj' belongs to a MultiheadAttention.*silently ignored"):
            inject_lora(model, LoRAConfig(target_modules=["out_proj"]))
        inject_lora(model, LoRAConfig())  # all-linear skips it and adapts the rest
        assert isinstance(model[1], LoRALinear) and not isinstance(model[0].out_proj, LoRALinear)

    def test_failed_injection_changes_nothing(self):
        model = tiny()
        with pytest.raises(ValueError):
            inject_lora(model, LoRAConfig(target_modules=["head", "missing"]))
        assert all(p.requires_grad for p in model.parameters())
        assert get_lora_config(model) is None and not isinstance(model.head, LoRALinear)


class TestInjection:
    def test_injected_equals_base_bit_for_bit(self):
        model = tiny()
        base = model(X)
        inject_lora(model, LoRAConfig(rank=2, use_dora=True))
        assert torch.equal(model(X), base)

    def test_freezes_base_and_keeps_keys(self):
        model = tiny()
        keys = set(model.state_dict())
        inject_lora(model, LoRAConfig(rank=2))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"{m}.lora_{x}" for m in ("encoder.0", "encoder.2", "head") for x in "AB"}
        assert keys <= set(model.state_dict())

    def test_only_adapters_get_gradients_and_base_is_unchanged(self):
        model = tiny()
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        inject_lora(model, LoRAConfig(rank=2))
        train(model)
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert all(".lora_" in n for n in with_grad) and with_grad
        for key, value in base_state.items():
            assert torch.equal(model.state_dict()[key], value), key

    def test_richboynet_sized_trainable_count(self):
        model = nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))
        inject_lora(model, LoRAConfig(rank=1, alpha=1))
        count = count_parameters(model)
        assert count.trainable == 6_794 == sum(1 * (i + o) for i, o in [(784, 1000), (1000, 2000), (2000, 10)])
        assert count.total == 2_807_010 + 6_794
        assert str(count) == "trainable params: 6,794 || all params: 2,813,804 || trainable%: 0.2415"

    def test_idempotent_with_same_config_refuses_another(self):
        model = tiny()
        config = LoRAConfig(rank=2)
        inject_lora(model, config)
        layer = model.head
        assert inject_lora(model, LoRAConfig(rank=2)) is model and model.head is layer
        with pytest.raises(ValueError, match="already holds adapters made with"):
            inject_lora(model, LoRAConfig(rank=3))

    def test_refuses_a_bare_linear_root(self):
        with pytest.raises(ValueError, match="needs a container module"):
            inject_lora(nn.Linear(2, 2), LoRAConfig())

    @pytest.mark.parametrize(
        ("bias", "expected"),
        [
            ("none", set()),
            ("lora_only", {"encoder.0.bias", "head.bias"}),
            ("all", {"encoder.0.bias", "encoder.2.bias", "head.bias"}),
        ],
    )
    def test_bias_policies(self, bias, expected):
        model = tiny()
        inject_lora(model, LoRAConfig(target_modules=["encoder.0", "head"], bias=bias))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        assert trainable == expected
        assert expected <= set(lora_state_dict(model))

    def test_modules_to_save_trains_a_copy_and_disable_restores_the_original(self):
        model = tiny()
        base = model(X)
        inject_lora(model, LoRAConfig(target_modules=["encoder.0"], modules_to_save=["head"]))
        assert isinstance(model.head, ModuleToSave)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "encoder.0.lora_A",
            "encoder.0.lora_B",
            "head.trained_module.weight",
            "head.trained_module.bias",
        }
        train(model)
        assert not torch.equal(model(X), base)
        with disable_lora(model):
            assert torch.equal(model(X), base)
        assert set(lora_state_dict(model)) == {
            "encoder.0.lora_A",
            "encoder.0.lora_B",
            "head.trained_module.weight",
            "head.trained_module.bias",
        }

    def test_lora_state_dict_is_structural_not_by_substring(self):
        model = nn.Sequential()
        model.add_module("lora_head", nn.Linear(4, 4))
        model.add_module("fc", nn.Linear(4, 4))
        inject_lora(model, LoRAConfig(target_modules=["fc"]))
        assert set(lora_state_dict(model)) == {"fc.lora_A", "fc.lora_B"}


class TestMergeAndDisable:
    @pytest.mark.parametrize("use_dora", [False, True])
    def test_merge_equals_unmerged_and_unmerge_restores(self, use_dora):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2, use_dora=use_dora))
        train(model)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            unmerged = model(X)
            merge_lora(model)
            torch.testing.assert_close(model(X), unmerged, atol=1e-5, rtol=0)
            merge_lora(model)
            torch.testing.assert_close(model(X), unmerged, atol=1e-5, rtol=0)
            unmerge_lora(model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)

    @pytest.mark.parametrize("use_dora", [False, True])
    def test_merge_and_unload_gives_plain_layers_with_same_outputs(self, use_dora):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2, use_dora=use_dora, modules_to_save=["head"]))
        train(model)
        with torch.no_grad():
            adapted = model(X)
        plain = merge_and_unload(model)
        kinds = {type(m) for m in plain.modules()}
        assert not kinds & {LoRALinear, ModuleToSave}
        assert all(type(m).__module__.startswith(("torch.", "test_inject")) for m in plain.modules())
        assert get_lora_config(plain) is None
        assert set(plain.state_dict()) == set(tiny().state_dict())
        torch.testing.assert_close(plain(X), adapted, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("use_dora", [False, True])
    def test_disable_is_bit_for_bit_after_training_and_on_merged_layers(self, use_dora):
        model = tiny()
        base = model(X)
        inject_lora(model, LoRAConfig(rank=2, use_dora=use_dora))
        train(model)
        assert not torch.equal(model(X), base)
        with disable_lora(model):
            assert torch.equal(model(X), base)
        merge_lora(model)
        with disable_lora(model):
            assert torch.equal(model(X), base)

    def test_disable_restores_state_on_exceptions(self):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2))
        with pytest.raises(RuntimeError, match="boom"), disable_lora(model):
            raise RuntimeError("boom")
        assert all(m.enabled for m in model.modules() if isinstance(m, LoRALinear))


class TestAdapterFiles:
    @pytest.fixture
    def trained(self, tmp_path):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2, alpha=4, use_dora=True, modules_to_save=["head"]))
        train(model)
        save_adapter(model, tmp_path / "adapter")
        return model, tmp_path / "adapter"

    def test_round_trip_is_bit_identical(self, trained):
        model, path = trained
        assert sorted(p.name for p in path.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
        fresh = load_adapter(tiny(), path)
        assert torch.equal(fresh(X), model(X))
        for key, value in lora_state_dict(model).items():
            assert torch.equal(lora_state_dict(fresh)[key], value)
        assert not any(t.requires_grad for t in lora_state_dict(fresh).values())  # detached
        assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(lora_state_dict(model))

    def test_config_file_records_config_version_and_fingerprint(self, trained):
        _, path = trained
        meta = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
        assert meta["lora_config"]["rank"] == 2 and meta["lora_config"]["use_dora"] is True
        assert meta["format_version"] == 1 and meta["lightning_lora_version"]
        layers = meta["base_fingerprint"]["layers"]
        assert set(layers) == {"encoder.0", "encoder.2"} and layers["encoder.0"]["shape"] == [8, 6]
        assert set(meta["base_fingerprint"]["modules_to_save"]) == {"head"}

    def test_saving_a_merged_model_fingerprints_the_base(self, trained, tmp_path):
        model, path = trained
        merge_lora(model)
        save_adapter(model, tmp_path / "merged")
        assert (
            json.loads((tmp_path / "merged" / ADAPTER_CONFIG_NAME).read_text())["base_fingerprint"]
            == json.loads((path / ADAPTER_CONFIG_NAME).read_text())["base_fingerprint"]
        )

    def test_refuses_another_base_unless_told(self, trained):
        _, path = trained
        other = tiny(seed=1)
        with pytest.raises(
            ValueError, match=r"made for another base model: 'encoder.0': different weights.*check_base=False"
        ):
            load_adapter(other, path)
        assert get_lora_config(other) is None
        load_adapter(other, path, check_base=False)
        assert get_lora_config(other) is not None

    def test_refuses_another_shape(self, trained):
        _, path = trained
        wide = tiny()
        wide.encoder[0] = nn.Linear(6, 9)
        wide.encoder[2] = nn.Linear(9, 8)
        with pytest.raises(ValueError, match=r"'encoder.0': shape \[8, 6\] vs \[9, 6\]"):
            load_adapter(wide, path)

    def test_missing_folder_and_missing_file(self, trained, tmp_path):
        _, path = trained
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_adapter(tiny(), tmp_path / "nowhere")
        (path / ADAPTER_WEIGHTS_NAME).unlink()
        with pytest.raises(FileNotFoundError, match=f"lacks {ADAPTER_WEIGHTS_NAME}"):
            load_adapter(tiny(), path)

    def test_truncated_weights_are_refused_and_model_left_alone(self, trained):
        _, path = trained
        data = (path / ADAPTER_WEIGHTS_NAME).read_bytes()
        (path / ADAPTER_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
        model = tiny()
        with pytest.raises(ValueError, match="not a valid safetensors file.*truncated"):
            load_adapter(model, path)
        assert get_lora_config(model) is None

    def test_a_pickle_is_refused_and_never_executed(self, trained, tmp_path):
        _, path = trained
        marker = tmp_path / "executed"

        class Exploit:
            def __reduce__(self):
                return (marker.write_text, ("pwned",))

        (path / ADAPTER_WEIGHTS_NAME).write_bytes(pickle.dumps({"encoder.0.lora_A": Exploit()}))
        with pytest.raises(ValueError, match="not a valid safetensors file"):
            load_adapter(tiny(), path)
        assert not marker.exists()

    def test_broken_and_newer_configs(self, trained):
        _, path = trained
        config_file = path / ADAPTER_CONFIG_NAME
        meta = json.loads(config_file.read_text())
        config_file.write_text("{not json")
        with pytest.raises(ValueError, match="is not valid JSON"):
            load_adapter(tiny(), path)
        config_file.write_text(json.dumps({**meta, "format_version": 99}))
        with pytest.raises(ValueError, match="format version 99, newer than.*upgrade lightning-lora"):
            load_adapter(tiny(), path)

    def test_mismatched_tensors_roll_back(self, trained):
        _, path = trained
        config_file = path / ADAPTER_CONFIG_NAME
        meta = json.loads(config_file.read_text())
        meta["lora_config"]["rank"] = 3
        config_file.write_text(json.dumps(meta))
        model = tiny()
        with pytest.raises(ValueError, match="wrong shape"):
            load_adapter(model, path)
        assert get_lora_config(model) is None
        assert not any(isinstance(m, (LoRALinear, ModuleToSave)) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())

    def test_save_replaces_atomically_and_refuses_plain_models(self, trained, tmp_path):
        model, path = trained
        before = (path / ADAPTER_WEIGHTS_NAME).read_bytes()
        train(model)
        save_adapter(model, path)
        assert (path / ADAPTER_WEIGHTS_NAME).read_bytes() != before
        assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folders left
        with pytest.raises(ValueError, match="holds no adapters to save"):
            save_adapter(tiny(), tmp_path / "x")


def test_the_core_imports_without_lightning():
    import subprocess
    import sys

    code = "import sys, lightning_lora, lightning_lora.inject; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    code = "import lightning_lora; print(lightning_lora.LoRAInjectionCallback.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "LoRAInjectionCallback"
