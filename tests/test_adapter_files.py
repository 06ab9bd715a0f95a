"""Adapter folders: PEFT's layout, fingerprints, and every way a folder can be wrong."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from helpers import Conv1DLike, require
from safetensors.torch import save_file
from torch import nn

from lightning_lora import (
    LoRAConfig,
    LoRALayer,
    ModuleToSave,
    get_lora_config,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from lightning_lora.core.adapter_folder import METADATA_KEY
from lightning_lora.core.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.core.safe_io import read_safetensors
from lightning_lora.errors import DataError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.proj = Conv1DLike(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(torch.relu(self.encoder(x))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().requires_grad_(False)


X = torch.randn(10, 6)


def train(model: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(32, 6)).pow(2).mean().backward()
        opt.step()


CONFIG = LoRAConfig(
    rank=2, alpha=4, use_dora=True, modules_to_save=["head"], bias="lora_only", rank_pattern={"proj": 3}
)


@pytest.fixture
def trained(tmp_path):
    model = inject_lora(net(), CONFIG)
    train(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def rewrite_config(path, **changes) -> None:
    config = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))


class TestRoundTrip:
    def test_round_trip_is_bit_identical(self, trained):
        model, path = trained
        assert sorted(p.name for p in path.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
        fresh = load_adapter(net(), path)
        assert torch.equal(fresh(X), model(X))
        assert lora_state_dict(fresh).keys() == lora_state_dict(model).keys()
        assert all(torch.equal(lora_state_dict(fresh)[k], v) for k, v in lora_state_dict(model).items())
        assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(lora_state_dict(model))

    def test_the_folder_is_peft_format_with_our_fingerprint_in_the_metadata(self, trained):
        _, path = trained
        config = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
        assert config["target_modules"] == ["encoder.0", "encoder.2", "proj"]
        assert config["fan_in_fan_out"] is True and config["rank_pattern"] == {"^proj": 3}
        tensors, metadata = read_safetensors(path / ADAPTER_WEIGHTS_NAME, "weights")
        assert "base_model.model.encoder.0.lora_A.weight" in tensors
        assert "base_model.model.encoder.0.lora_magnitude_vector" in tensors
        assert "base_model.model.encoder.0.base_layer.bias" in tensors  # lora_only bias, as PEFT names it
        assert "base_model.model.head.weight" in tensors  # modules_to_save, as PEFT names it
        fingerprint = json.loads(metadata[METADATA_KEY])["base_fingerprint"]
        assert set(fingerprint) == {
            "encoder.0.weight",
            "encoder.0.bias",
            "encoder.2.weight",
            "encoder.2.bias",
            "proj.weight",
            "proj.bias",
            "head.weight",
            "head.bias",
        }

    def test_saving_a_merged_model_writes_the_same_folder(self, trained, tmp_path):
        model, path = trained
        merge_lora(model)
        save_adapter(model, tmp_path / "merged")
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            assert (tmp_path / "merged" / name).read_bytes() == (path / name).read_bytes()

    def test_loading_into_a_merged_model_replaces_its_update(self, trained, tmp_path):
        model, path = trained
        other = inject_lora(net(), CONFIG)
        train(other, steps=2)
        merge_lora(other)
        load_adapter(other, path)
        assert all(layer.merged for _, layer in other.named_modules() if isinstance(layer, LoRALayer))
        torch.testing.assert_close(other(X), model(X), atol=1e-5, rtol=1e-5)

    def test_keys_never_carry_wrapper_prefixes(self, trained, tmp_path):
        model, path = trained
        save_adapter(torch.compile(model), tmp_path / "compiled")
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            assert (tmp_path / "compiled" / name).read_bytes() == (path / name).read_bytes()
        fresh = load_adapter(torch.compile(net()), path)
        torch.testing.assert_close(fresh(X), model(X), atol=1e-6, rtol=1e-6)


class TestRefusals:
    def test_another_base_unless_told(self, trained):
        _, path = trained
        other = net(seed=1)
        with pytest.raises(
            ValueError, match=r"made for another base model: 'encoder.0.bias' differs.*check_base=False"
        ):
            load_adapter(other, path)
        assert get_lora_config(other) is None
        load_adapter(other, path, check_base=False)
        assert get_lora_config(other) is not None

    def test_another_shape(self, trained):
        _, path = trained
        wide = net()
        wide.encoder[0], wide.encoder[2] = nn.Linear(6, 9), nn.Linear(9, 8)
        with pytest.raises(ValueError, match=r"'encoder.0.bias' differs \(shape \[8\] vs \[9\]\)"):
            load_adapter(wide, path)

    def test_missing_folder_and_missing_file(self, trained, tmp_path):
        _, path = trained
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_adapter(net(), tmp_path / "nowhere")
        (path / ADAPTER_WEIGHTS_NAME).unlink()
        with pytest.raises(FileNotFoundError, match=f"lacks {ADAPTER_WEIGHTS_NAME}"):
            load_adapter(net(), path)

    @pytest.mark.parametrize("field", ["lora_alpha", "r", "target_modules", "bias", "modules_to_save"])
    def test_every_field_the_adapter_needs_is_required(self, trained, field):
        _, path = trained
        rewrite_config(path, **{field: None})
        with pytest.raises(ValueError, match=rf"lacks \['{field}'\], which the adapter needs"):
            load_adapter(net(), path)

    def test_fields_peft_added_later_may_be_absent_meaning_off(self, tmp_path):
        model = inject_lora(net(), LoRAConfig(rank=2, alpha=4))
        train(model)
        save_adapter(model, tmp_path / "old")
        rewrite_config(tmp_path / "old", use_dora=None, use_rslora=None, rank_pattern=None, alpha_pattern=None)
        assert torch.equal(load_adapter(net(), tmp_path / "old")(X), model(X))

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"peft_type": "IA3"}, "describes a 'IA3' adapter"),
            (
                {"layers_to_transform": [0]},
                r"PEFT features lightning-lora does not implement: \['layers_to_transform'\]",
            ),
            (
                {"init_lora_weights": "pissa_niter_4"},
                "init_lora_weights='pissa_niter_4'",
            ),  # PiSSA's fast SVD: not implemented
            ({"r": 0}, "LoRAConfig.rank must be an integer >= 1, got 0"),
            ({"lora_alpha": "big"}, "LoRAConfig.alpha must be a finite number > 0"),
            ({"r": 4}, "does not fit|unusable tensors"),
        ],
    )
    def test_broken_or_foreign_configs(self, trained, changes, message):
        _, path = trained
        rewrite_config(path, **changes)
        model = net()
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
        assert get_lora_config(model) is None and not any(
            isinstance(m, (LoRALayer, ModuleToSave)) for m in model.modules()
        )

    def test_not_json_nested_too_deep_and_too_big(self, trained):
        _, path = trained
        config = path / ADAPTER_CONFIG_NAME
        config.write_text("{not json")
        with pytest.raises(ValueError, match="is not valid JSON"):
            load_adapter(net(), path)
        config.write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(ValueError, match="nested too deeply"):
            load_adapter(net(), path)
        config.write_text(" " * (2 << 20))
        with pytest.raises(ValueError, match="far more than such a file holds"):
            load_adapter(net(), path)

    def test_a_huge_rank_is_refused_before_allocating(self, trained, monkeypatch):
        _, path = trained
        rewrite_config(path, r=10**9)
        monkeypatch.setattr(LoRALayer, "__init__", lambda *a, **k: pytest.fail("allocated"))
        with pytest.raises(ValueError, match="would allocate about .* more than the whole model"):
            load_adapter(net(), path)

    @pytest.mark.parametrize("bad", ["nan", "inf", "int"])
    def test_non_finite_or_non_float_tensors(self, trained, bad):
        _, path = trained
        tensors, metadata = read_safetensors(path / ADAPTER_WEIGHTS_NAME, "w")
        key = "base_model.model.encoder.0.lora_B.weight"
        if bad == "int":
            tensors[key] = tensors[key].to(torch.int32)
        else:
            tensors[key] = tensors[key].fill_(float(bad))
        save_file(tensors, path / ADAPTER_WEIGHTS_NAME, metadata)
        model = net()
        with pytest.raises(ValueError, match="NaN or infinite|not a float"):
            load_adapter(model, path)
        assert get_lora_config(model) is None
        assert all(not p.requires_grad for p in model.parameters())

    def test_truncated_and_pickled_weights_are_refused_and_never_executed(self, trained, tmp_path):
        _, path = trained
        weights = path / ADAPTER_WEIGHTS_NAME
        weights.write_bytes(weights.read_bytes()[:200])
        with pytest.raises(ValueError, match="not a valid safetensors file.*truncated"):
            load_adapter(net(), path)
        marker = tmp_path / "executed"

        class Exploit:
            def __reduce__(self):
                return (marker.write_text, ("pwned",))

        weights.write_bytes(pickle.dumps({"encoder.0.lora_A": Exploit()}))
        with pytest.raises(ValueError, match="not a valid safetensors file"):
            load_adapter(net(), path)
        assert not marker.exists()

    def test_a_newer_format_and_a_folder_without_fingerprint(self, trained, caplog):
        _, path = trained
        tensors, metadata = read_safetensors(path / ADAPTER_WEIGHTS_NAME, "w")
        newer = json.loads(metadata[METADATA_KEY])
        newer["format_version"] = 99
        save_file(tensors, path / ADAPTER_WEIGHTS_NAME, {**metadata, METADATA_KEY: json.dumps(newer)})
        with pytest.raises(ValueError, match="format version 99, newer than.*upgrade lightning-lora"):
            load_adapter(net(), path)
        save_file(tensors, path / ADAPTER_WEIGHTS_NAME, {"format": "pt"})
        with caplog.at_level("WARNING", logger="lightning_lora"):
            load_adapter(net(seed=3), path)  # PEFT's folders carry no fingerprint: loaded, with a notice
        assert "has no base fingerprint" in caplog.text

    def test_saving_refuses_plain_models_and_non_finite_adapters(self, trained, tmp_path):
        model, _ = trained
        with pytest.raises(ValueError, match="holds no adapters to save"):
            save_adapter(net(), tmp_path / "x")
        with torch.no_grad():
            model.encoder[0].lora_B.fill_(float("nan"))
        with pytest.raises(ValueError, match="NaN or infinite"):
            save_adapter(model, tmp_path / "nan")
        assert not (tmp_path / "nan").exists()


class TestWhatAStrangerFound:
    """Cases an outside tester broke once; each must stay fixed."""

    def test_patterns_for_a_name_that_ends_another_stay_per_layer_both_ways(self, tmp_path):
        peft = require("peft")

        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.sub = nn.Linear(4, 4), nn.Module()
                self.sub.fc = nn.Linear(4, 4)

            def forward(self, x):
                return self.sub.fc(self.fc(x))

        torch.manual_seed(0)
        base, x = Two().requires_grad_(False), torch.randn(3, 4)
        config = LoRAConfig(rank=4, alpha=4, alpha_pattern={"sub.fc": 2.0, "fc": 16.0}, rank_pattern={"sub.fc": 2})
        model = inject_lora(copy.deepcopy(base), config)
        assert (model.sub.fc.rank, model.sub.fc.scale, model.fc.scale) == (2, 1.0, 4.0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        save_adapter(model, tmp_path / "ours")
        assert torch.equal(load_adapter(copy.deepcopy(base), tmp_path / "ours")(x), model(x))
        with warnings.catch_warnings(action="ignore"):
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(theirs(x), model(x))
        with warnings.catch_warnings(action="ignore"):  # PEFT's own regex, anchored at the start
            peft_model = peft.get_peft_model(
                copy.deepcopy(base),
                peft.LoraConfig(r=4, lora_alpha=4, target_modules=["fc"], alpha_pattern={"^fc": 32}),
            )
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_()
            peft_model.save_pretrained(tmp_path / "theirs")
        ours = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
        assert (ours.fc.scale, ours.sub.fc.scale) == (8.0, 1.0)
        torch.testing.assert_close(ours(x), peft_model(x))

    def test_peft_folders_with_exclusions_and_names_this_model_lacks(self, tmp_path):
        peft = require("peft")
        base = net()
        with warnings.catch_warnings(action="ignore"):
            peft_model = peft.get_peft_model(
                copy.deepcopy(base),
                peft.LoraConfig(r=2, target_modules=["0", "2", "q_proj"], exclude_modules=["encoder.2"]),
            )
            peft_model.save_pretrained(tmp_path / "theirs")
        model = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
        assert isinstance(model.encoder[0], LoRALayer) and not isinstance(model.encoder[2], LoRALayer)

    def test_integer_buffers_of_modules_to_save_round_trip(self, tmp_path):
        class WithNorm(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 8)
                self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))

            def forward(self, x):
                return self.head(self.fc(x))

        torch.manual_seed(0)
        base, x = WithNorm().requires_grad_(False), torch.randn(6, 8)
        model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, target_modules=["fc"], modules_to_save=["head"]))
        model(x)  # train mode: the trained copy's running statistics move
        save_adapter(model, tmp_path / "a")
        fresh = load_adapter(copy.deepcopy(base), tmp_path / "a")
        assert torch.equal(fresh.eval()(x), model.eval()(x))
        assert fresh.head.trained_module[0].num_batches_tracked == 1

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn])
    def test_values_that_overflow_or_dtypes_this_package_cannot_read(self, trained, dtype):
        _, path = trained
        tensors, metadata = read_safetensors(path / ADAPTER_WEIGHTS_NAME, "w")
        key = "base_model.model.encoder.0.lora_B.weight"
        tensors[key] = torch.full_like(tensors[key], 1e300, dtype=torch.float64).to(dtype)
        save_file(tensors, path / ADAPTER_WEIGHTS_NAME, metadata)
        with pytest.raises(ValueError, match="NaN or infinite values \\(as torch.float32\\)|not a float type"):
            load_adapter(net(), path)

    def test_a_config_edited_to_target_other_layers_is_named_as_such_not_as_another_base(self, trained):
        _, path = trained
        config = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
        config["target_modules"] = ["encoder.0"]
        (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
        edited = r"targets layers \['encoder.0', 'head'\], but the adapter was saved for layers \[.*edited or damaged"
        with pytest.raises(ValueError, match=edited):
            load_adapter(net(), path)

    def test_a_base_cast_to_half_precision_is_still_the_base(self, trained):
        model, path = trained
        half = load_adapter(net().to(torch.bfloat16), path)
        assert get_lora_config(half) is not None
        with pytest.raises(ValueError, match="made for another base model"):
            load_adapter(net(seed=2).to(torch.bfloat16), path)

    def test_loading_other_layers_into_existing_adapters_says_so(self, trained):
        _, path = trained
        other = inject_lora(net(), LoRAConfig(rank=2, alpha=4, target_modules=["encoder.0"]))
        with pytest.raises(ValueError, match="already holds an adapter .default. other than the one in"):
            load_adapter(other, path)


class Blocks(nn.Module):
    """GPT-2's naming at 24 layers: what a large per-layer rank_pattern is matched against."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList(
            nn.ModuleDict({"c_attn": nn.Linear(4, 4), "c_proj": nn.Linear(4, 4), "c_fc": nn.Linear(4, 4)})
            for _ in range(24)
        )


def test_many_slow_pattern_keys_are_refused_within_seconds_and_many_plain_ones_load(tmp_path):
    """Each key alone is matched in linear time; what bounds a file of thousands of keys is their shared budget."""
    import time

    model = inject_lora(Blocks(), LoRAConfig(rank=2, target_modules=["c_attn", "c_fc"]))
    save_adapter(model, tmp_path / "adapter")
    plain = {rf"h\.{i}\.c_attn": 2 for i in range(24)} | {rf"h\.{i}\.c_fc": 2 for i in range(24)}
    rewrite_config(tmp_path / "adapter", target_modules=r".*\.(c_attn|c_fc)", rank_pattern=plain)
    loaded = load_adapter(Blocks(), tmp_path / "adapter", check_base=False)
    assert sum(1 for _ in lora_layers(loaded)) == 48
    slow = {rf"(?:(?:.?){{80}}){{80}}!{i}": 2 for i in range(400)}
    rewrite_config(tmp_path / "adapter", target_modules=r".*\.(c_attn|c_fc)", rank_pattern=slow)
    fresh = Blocks()
    began = time.perf_counter()
    with pytest.raises(
        DataError, match=r"rank_pattern key .*: (matching needs over 64 automaton steps|the patterns together)"
    ):
        load_adapter(fresh, tmp_path / "adapter", check_base=False)
    assert time.perf_counter() - began < 10  # was over a minute at 150 keys
    assert not any(True for _ in lora_layers(fresh))  # refused before anything was injected


def test_the_layers_peft_gets_wrong_are_named_where_export_says_how_to_load():
    from lightning_lora.core.adapter_folder import layers_peft_gets_wrong

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.grouped = nn.Conv2d(4, 4, 3, groups=2)
            self.plain = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 4)

    model = inject_lora(Mixed(), LoRAConfig(rank=2, target_modules=["attn", "grouped", "plain", "fc"]))
    assert layers_peft_gets_wrong(model) == ["attn", "grouped"]
    assert layers_peft_gets_wrong(inject_lora(net(), LoRAConfig(rank=2))) == []
