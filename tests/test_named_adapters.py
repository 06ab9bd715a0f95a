"""Several adapters on one model: adding, switching, combining outputs, merging and deleting by name.

The invariants of one adapter hold per name (disabled == base bit for bit, only active adapters get
gradients, merged == unmerged), and PEFT's semantics are the reference where PEFT has the feature
(``add_adapter``, ``set_adapter([...])``, ``adapter_names=`` in forward), to 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DORA_KINDS, LAYER_ZOO, assert_same_per_adapter, move_adapters, require, zoo_model
from torch import nn

from lightning_lora import (
    LoRAConfig,
    adapter_per_sample,
    adapter_stats,
    delete_adapter,
    disable_lora,
    get_lora_config,
    inject_lora,
    lora_adapter_names,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    set_active_adapters,
    unmerge_lora,
    use_adapters,
)

KINDS = list(LAYER_ZOO)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def two_adapters(kind: str | None = None, **second) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A base, and a copy holding adapter "a" (rank 2) and "b" (rank 3 unless given), both moved."""
    if kind is None:
        base, x = Net().requires_grad_(False), torch.randn(6, 12)
        targets: list[str] | str = "all-linear"
    else:
        base, x = zoo_model(kind)
        targets = ["layer"]
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, alpha=4, target_modules=targets))
    inject_lora(model, LoRAConfig(**{"rank": 3, "alpha": 3, "target_modules": targets, **second}), adapter_name="b")
    return base, move_adapters(model), x


def alone(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` holding only adapter ``name`` (the others deleted)."""
    copied = copy.deepcopy(model)
    for other in [n for n in lora_adapter_names(copied) if n != name]:
        delete_adapter(copied, other)
    set_active_adapters(copied, name)
    return copied


class TestAdding:
    def test_a_second_name_adds_an_inactive_frozen_adapter_and_leaves_the_first_as_it_was(self):
        base, x = Net().requires_grad_(False), torch.randn(6, 12)
        model = move_adapters(inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, target_modules=["fc1", "head"])))
        before = model(x)
        inject_lora(model, LoRAConfig(rank=4, target_modules=["fc2", "head"]), adapter_name="other")
        assert lora_adapter_names(model) == ["default", "other"]
        assert torch.equal(model(x), before)  # inactive until chosen, as PEFT's add_adapter
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
        assert {n for n, _ in lora_layers(model)} == {"fc1", "fc2", "head"}
        assert model.head.lora_adapters["other"].rank == 4 and model.fc2.active_adapters == ["default"]
        assert get_lora_config(model, "other").rank == 4 and get_lora_config(model).rank == 2

    def test_the_same_name_and_config_is_idempotent_and_another_config_is_refused(self):
        _, model, _ = two_adapters()
        inject_lora(model, LoRAConfig(rank=3, alpha=3, target_modules="all-linear"), adapter_name="b")
        with pytest.raises(ValueError, match="already holds an adapter named 'b'.*Pick another adapter_name"):
            inject_lora(model, LoRAConfig(rank=5, target_modules="all-linear"), adapter_name="b")

    @pytest.mark.parametrize("name", ["", "a.b", "x/y", "__base__", 3])
    def test_a_name_that_cannot_name_an_adapter_is_refused(self, name):
        with pytest.raises(ValueError, match="cannot name an adapter"):
            inject_lora(Net(), LoRAConfig(rank=2), adapter_name=name)

    @pytest.mark.parametrize("name", ["half", "to", "forward", "training", "keys"])
    def test_a_name_of_a_module_attribute_is_refused_before_anything_changes(self, name):
        _, model, x = two_adapters()
        out = model(x)
        with pytest.raises(ValueError, match=f"'{name}' is the name of a torch.nn.Module attribute.*pick another"):
            inject_lora(model, LoRAConfig(rank=2, target_modules="all-linear"), adapter_name=name)
        assert lora_adapter_names(model) == ["default", "b"] and torch.equal(model(x), out)

    def test_a_second_adapter_may_not_train_biases_or_whole_modules(self):
        _, model, _ = two_adapters()
        with pytest.raises(ValueError, match="belong to the model's first adapter"):
            inject_lora(model, LoRAConfig(rank=2, bias="all"), adapter_name="c")
        with pytest.raises(ValueError, match="belong to the model's first adapter"):
            inject_lora(model, LoRAConfig(rank=2, target_modules=["fc1"], modules_to_save=["head"]), adapter_name="c")
        assert lora_adapter_names(model) == ["default", "b"]

    def test_a_failing_second_adapter_leaves_the_model_as_it_was(self):
        _, model, x = two_adapters()
        keys, out = set(model.state_dict()), model(x)
        with pytest.raises(ValueError):
            inject_lora(model, LoRAConfig(rank=2, target_modules=["nothing_here"]), adapter_name="c")
        assert set(model.state_dict()) == keys and torch.equal(model(x), out)
        assert lora_adapter_names(model) == ["default", "b"]


class TestSwitching:
    def test_active_adapters_add_their_updates_and_each_alone_is_itself(self):
        base, model, x = two_adapters()
        with torch.no_grad():
            outs = {}
            for names in (["default"], ["b"], ["default", "b"]):
                set_active_adapters(model, names)
                outs[tuple(names)] = model.fc1(x)
            base_out = base.fc1(x)
        both = outs[("default",)] - base_out + outs[("b",)] - base_out + base_out
        torch.testing.assert_close(outs[("default", "b")], both, atol=1e-6, rtol=1e-6)
        set_active_adapters(model, "b")
        torch.testing.assert_close(model(x), alone(model, "b")(x), atol=0, rtol=0)

    @pytest.mark.parametrize("kind", KINDS)
    def test_disabled_is_the_base_bit_for_bit_with_two_adapters_active_or_merged(self, kind):
        base, model, x = two_adapters(kind)
        set_active_adapters(model, ["default", "b"])
        expected = base(x)
        with disable_lora(model):
            assert torch.equal(model(x), expected)
        merge_lora(model)
        with disable_lora(model):
            assert torch.equal(model(x), expected)

    @pytest.mark.parametrize("kind", KINDS)
    def test_only_the_active_adapters_get_gradients(self, kind):
        _, model, x = two_adapters(kind)
        set_active_adapters(model, "b")
        model(x).float().pow(2).sum().backward()
        for name, param in model.named_parameters():
            if ".lora_adapters.b." in name:
                assert param.requires_grad and param.grad is not None, name
            else:
                assert not param.requires_grad and param.grad is None, name

    def test_use_adapters_restores_the_previous_state_also_when_the_block_raises(self):
        _, model, x = two_adapters()
        out = model(x)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match="inside"):
            with use_adapters(model, ["b", "default"]):
                assert model.fc1.active_adapters == ["b", "default"]
                raise RuntimeError("inside")
        assert torch.equal(model(x), out) and flags == {n: p.requires_grad for n, p in model.named_parameters()}

    def test_switching_away_from_a_merged_adapter_unmerges_it_as_peft_does_and_use_adapters_merges_it_back(self):
        from lightning_lora import merge_lora

        _, model, x = two_adapters()
        with torch.no_grad():
            b_alone = alone(model, "b")(x)
            merge_lora(model, ["default"])
            merged = model(x)
            with use_adapters(model, "b"):
                assert torch.equal(model(x), b_alone) and model.fc1.merged_adapters == []
            assert model.fc1.merged_adapters == ["default"] and torch.equal(model(x), merged)
            set_active_adapters(model, "b")  # PEFT's set_adapter unmerges too (with a warning)
            assert model.fc1.merged_adapters == [] and torch.equal(model(x), b_alone)
            with adapter_per_sample(model, ["b"] * len(x)):
                with pytest.raises(ValueError, match="inside an adapter_per_sample block; leave the block first"):
                    set_active_adapters(model, "default")
            assert model.fc1.active_adapters == ["b"]

    def test_use_adapters_leaves_a_trainable_adapter_active_when_the_block_deleted_the_previous_one(self):
        _, model, x = two_adapters()
        with use_adapters(model, "b"):
            delete_adapter(model, "default")
        assert model.fc1.active_adapters == ["b"]
        assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_adapters.b." in n)
        _, model, x = two_adapters()
        inject_lora(model, LoRAConfig(rank=2, target_modules="all-linear"), adapter_name="c")
        set_active_adapters(model, ["default", "b"])
        with use_adapters(model, "c"):
            delete_adapter(model, "b")
        assert model.fc1.active_adapters == ["default"]

    @pytest.mark.parametrize(
        ("names", "message"),
        [("c", "no adapter named 'c'; its adapters are \\['default', 'b'\\]"), ([], "non-empty list"),
         (["b", "b"], "listed twice")],
    )  # fmt: skip
    def test_unknown_names_are_refused_naming_the_adapters_there_are(self, names, message):
        _, model, _ = two_adapters()
        with pytest.raises(ValueError, match=message):
            set_active_adapters(model, names)


class TestMerging:
    @pytest.mark.parametrize("kind", KINDS)
    def test_merging_by_name_equals_unmerged_and_unmerging_gives_the_base_tensor_back(self, kind):
        base, model, x = two_adapters(kind)
        weights = {n: layer.base_weight() for n, layer in lora_layers(model)}
        set_active_adapters(model, ["default", "b"])
        with torch.no_grad():
            unmerged = model(x)
            merge_lora(model, ["b"])
            torch.testing.assert_close(model(x), unmerged, atol=2e-5, rtol=1e-5)
            merge_lora(model)  # the active ones: "default" joins "b"
            assert all(layer.merged_adapters == ["b", "default"] for _, layer in lora_layers(model))
            torch.testing.assert_close(model(x), unmerged, atol=2e-5, rtol=1e-5)
            unmerge_lora(model, ["b"])
            torch.testing.assert_close(model(x), unmerged, atol=2e-5, rtol=1e-5)
            unmerge_lora(model)
        for name, layer in lora_layers(model):
            assert getattr(layer, layer.weight_name) is weights[name]  # the very tensor: ties survive

    @pytest.mark.parametrize("kind", DORA_KINDS)
    def test_a_dora_adapter_beside_a_lora_one_merges_exactly_and_each_is_defined_against_the_base(self, kind):
        base, model, x = two_adapters(kind, use_dora=True)
        set_active_adapters(model, ["default", "b"])
        with torch.no_grad():
            unmerged = model(x)
            expected = alone(model, "default")(x) - base(x) + alone(model, "b")(x)
            torch.testing.assert_close(unmerged, expected, atol=2e-5, rtol=1e-5)
            merge_lora(model)
            torch.testing.assert_close(model(x), unmerged, atol=2e-5, rtol=1e-5)

    def test_merge_and_unload_merges_the_named_adapters_into_plain_layers(self):
        base, model, x = two_adapters()
        with torch.no_grad():
            expected = alone(model, "b")(x)
            plain = merge_and_unload(model, ["b"])
        assert not list(lora_layers(plain)) and type(plain.fc1) is nn.Linear
        torch.testing.assert_close(plain(x), expected, atol=2e-5, rtol=1e-5)


class TestDeleting:
    def test_deleting_one_leaves_the_other_computing_what_it_computed(self):
        base, model, x = two_adapters()
        set_active_adapters(model, ["b"])
        expected = model(x)
        delete_adapter(model, "default")
        assert lora_adapter_names(model) == ["b"] and all(".default." not in k for k in model.state_dict())
        assert torch.equal(model(x), expected)
        delete_adapter(model, "b")  # the last one: the plain base again
        assert not list(lora_layers(model)) and torch.equal(model(x), base(x))

    def test_deleting_the_active_one_activates_the_first_remaining(self):
        _, model, x = two_adapters()
        delete_adapter(model, "default")
        assert model.fc1.active_adapters == ["b"]
        assert all(p.requires_grad for _, layer in lora_layers(model) for p in layer.lora_adapters.parameters())

    def test_a_layer_only_one_adapter_had_goes_back_to_its_base_type(self):
        model = inject_lora(Net(), LoRAConfig(rank=2, target_modules=["fc1"]))
        inject_lora(model, LoRAConfig(rank=2, target_modules=["fc2"]), adapter_name="b")
        delete_adapter(model, "b")
        assert type(model.fc2) is nn.Linear and {n for n, _ in lora_layers(model)} == {"fc1"}

    def test_unknown_or_merged_adapters_are_refused(self):
        _, model, _ = two_adapters()
        with pytest.raises(ValueError, match="no adapter named 'zzz'"):
            delete_adapter(model, "zzz")
        merge_lora(model, ["b"])
        with pytest.raises(ValueError, match="'b' is merged; call unmerge_lora"):
            delete_adapter(model, "b")


class TestReadingOut:
    def test_state_dicts_hold_every_adapter_or_one(self):
        _, model, _ = two_adapters()
        everything, only_b = lora_state_dict(model), lora_state_dict(model, "b")
        assert set(only_b) == {k for k in everything if ".lora_adapters.b." in k} and len(only_b) == 6
        assert {s.adapter for s in adapter_stats(model)} == {"default", "b"}
        assert {s.rank for s in adapter_stats(model) if s.adapter == "b"} == {3}


class TestPerSample:
    @pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("attention")])
    def test_every_sample_gets_what_it_gets_alone_with_its_adapter(self, kind):
        base, model, x = two_adapters(kind)
        names = (["b", "__base__", "default"] * 3)[: x.shape[0]]
        with torch.no_grad(), adapter_per_sample(model, names):
            mixed = model(x)
        with torch.no_grad():
            for i, name in enumerate(names):
                reference = base if name == "__base__" else alone(model, name)
                expected = reference(x)[i]
                tolerance = 0 if name == "__base__" else 1e-5
                torch.testing.assert_close(mixed[i], expected, atol=tolerance, rtol=tolerance)

    def test_gradients_reach_each_adapter_from_its_own_samples_only(self):
        _, model, x = two_adapters()
        set_active_adapters(model, ["default", "b"])
        with adapter_per_sample(model, ["b"] * 6):
            model(x).sum().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if ".default." in n)
        assert all(p.grad is not None for n, p in model.named_parameters() if ".b." in n)

    @pytest.mark.parametrize(
        ("names", "message"),
        [(["b"] * 5, "given 5 adapter names but a layer's input has 6 samples"),
         (["b"] * 5 + ["nope"], "no adapter named 'nope'"), ("b", "non-empty list")],
    )  # fmt: skip
    def test_wrong_lengths_and_names_are_refused(self, names, message):
        _, model, x = two_adapters()
        with pytest.raises(ValueError, match=message):
            with adapter_per_sample(model, names):
                model(x)
        assert all(layer.sample_adapters is None for _, layer in lora_layers(model))

    def test_merged_models_attention_and_trained_biases_are_refused_with_the_fix(self):
        _, model, x = two_adapters()
        merge_lora(model)
        with pytest.raises(ValueError, match="merged model: call unmerge_lora"):
            with adapter_per_sample(model, ["b"] * 6):
                pass
        _, attention, y = two_adapters("attention_batch_first")
        with pytest.raises(ValueError, match="does not serve nn.MultiheadAttention.*set_active_adapters"):
            with adapter_per_sample(attention, ["b", "default"]):
                attention(y)
        biased = inject_lora(Net(), LoRAConfig(rank=2, bias="all"))
        with pytest.raises(ValueError, match="trains biases or modules_to_save"):
            with adapter_per_sample(biased, ["default"] * 6):
                pass


class TestAgainstPEFT:
    """PEFT's add_adapter / set_adapter([...]) / adapter_names= with the same tensors give the same outputs."""

    @pytest.fixture
    def pair(self):
        peft = require("peft")
        base, model, x = two_adapters()
        targets = ["fc1", "fc2", "head"]
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        )
        theirs.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=3, target_modules=targets))
        with torch.no_grad():
            for name, layer in lora_layers(model):
                peft_layer = theirs.base_model.model.get_submodule(name)
                for adapter_name, adapter in layer.lora_adapters.items():
                    peft_layer.lora_A[adapter_name].weight.copy_(adapter.lora_A)
                    peft_layer.lora_B[adapter_name].weight.copy_(adapter.lora_B)
        return model, theirs, x

    def test_several_active_adapters_equal_peft_s(self, pair):
        model, theirs, x = pair
        for names in (["default"], ["b"], ["default", "b"]):
            set_active_adapters(model, names)
            theirs.base_model.set_adapter(names)
            torch.testing.assert_close(model(x), theirs(x), atol=1e-5, rtol=1e-5)

    def test_per_sample_adapters_equal_peft_s_adapter_names(self, pair):
        model, theirs, x = pair
        names = ["b", "__base__", "default", "default", "b", "__base__"]
        model.eval(), theirs.eval()  # PEFT takes adapter_names in eval mode only
        with torch.no_grad(), adapter_per_sample(model, names):
            ours = model(x)
        torch.testing.assert_close(ours, theirs(x, adapter_names=names), atol=1e-5, rtol=1e-5)


class TestBesideTheSingleAdapterPaths:
    """What the one-adapter paths (files, checkpoints, the callback) do once a model holds several."""

    def test_an_adapter_folder_holds_the_primary_adapter_and_loads_back(self, tmp_path):
        from lightning_lora import load_adapter, save_adapter

        base, model, x = two_adapters()
        save_adapter(model, tmp_path / "adapter")
        fresh = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), alone(model, "default")(x), atol=0, rtol=0)
        load_adapter(model, tmp_path / "adapter")  # into the model holding both: the primary's values again

    def test_a_failed_load_leaves_the_merged_adapters_as_they_were(self, tmp_path):
        from lightning_lora import load_adapter, save_adapter

        _, model, x = two_adapters()
        other = inject_lora(Net(), LoRAConfig(rank=5, target_modules=["fc1"]))
        save_adapter(other, tmp_path / "other")
        merge_lora(model, ["b"])
        out = model(x)
        with pytest.raises(ValueError):
            load_adapter(model, tmp_path / "other", check_base=False)
        assert all(layer.merged_adapters == ["b"] for _, layer in lora_layers(model))
        assert torch.equal(model(x), out)

    def test_adapter_only_checkpoints_hold_every_adapter_and_restore_which_is_active(self):
        from lightning_lora.demo.classifiers import LitClassifier
        from lightning_lora.demo.nets import MLP

        def module() -> LitClassifier:
            torch.manual_seed(0)
            return LitClassifier(MLP(hidden_sizes=[8]))

        model = module()
        inject_lora(model.net, LoRAConfig(rank=2))
        inject_lora(model.net, LoRAConfig(rank=3, target_modules=["layers.0"]), adapter_name="b")
        move_adapters(model.net)
        set_active_adapters(model.net, "b")
        checkpoint = {"state_dict": model.state_dict()}
        model.on_save_checkpoint(checkpoint)
        assert {k.split(".lora_adapters.")[1].split(".")[0] for k in checkpoint["state_dict"]} == {"default", "b"}
        fresh = module()
        fresh.on_load_checkpoint(checkpoint)
        fresh.load_state_dict(checkpoint["state_dict"], strict=True)
        assert lora_adapter_names(fresh.net) == ["default", "b"] and fresh.net.layers[0].active_adapters == ["b"]
        x = torch.randn(4, 784)
        for names in ("b", "default"):
            set_active_adapters(model.net, names), set_active_adapters(fresh.net, names)
            assert torch.equal(fresh(x), model(x))

    def test_the_callback_refuses_a_network_holding_adapters_it_did_not_make(self):
        from lightning_lora import LoRAInjectionCallback
        from lightning_lora.demo.classifiers import LitClassifier
        from lightning_lora.demo.nets import MLP
        from lightning_lora.errors import UsageError

        module = LitClassifier(MLP(hidden_sizes=[8]))
        inject_lora(module.net, LoRAConfig(rank=2), adapter_name="digit9")
        with pytest.raises(UsageError, match=r"already holds adapters \['digit9'\] that this callback did not make"):
            LoRAInjectionCallback(rank=2).inject_into(module)
        assert lora_adapter_names(module.net) == ["digit9"]

    def test_deleting_an_attention_s_adapter_takes_its_out_proj_s_too(self):
        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 8)

            def forward(self, x):
                return self.fc(self.attn(x, x, x)[0])

        # Frozen, as injection leaves it: eval-mode attention takes torch's fused path only without grads.
        base, x = Block().eval().requires_grad_(False), torch.randn(2, 3, 8)
        model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, target_modules=["fc"]))
        inject_lora(model, LoRAConfig(rank=2, target_modules=["attn"]), adapter_name="b")
        delete_adapter(model, "b")
        assert type(model.attn) is nn.MultiheadAttention and lora_adapter_names(model) == ["default"]
        assert torch.equal(model(x), base(x))

    def test_the_owner_of_trained_modules_stays_active(self):
        model = inject_lora(Net(), LoRAConfig(rank=2, target_modules=["fc1"], modules_to_save=["head"]))
        inject_lora(model, LoRAConfig(rank=2, target_modules=["fc1"]), adapter_name="b")
        with pytest.raises(ValueError, match=r"'default' trains biases or modules_to_save.*\['default', 'b'\]"):
            set_active_adapters(model, "b")
        set_active_adapters(model, ["default", "b"])

    def test_changes_inside_the_blocks_are_refused_or_survived(self):
        _, model, x = two_adapters()
        with adapter_per_sample(model, ["b"] * 6):
            with pytest.raises(RuntimeError, match="inside an adapter_per_sample block"):
                merge_lora(model, ["b"])
            with pytest.raises(ValueError, match="inside an adapter_per_sample block"):
                delete_adapter(model, "b")
        with use_adapters(model, "b"):
            delete_adapter(model, "default")
        assert lora_adapter_names(model) == ["b"] and model.fc1.active_adapters == ["b"]
        with pytest.raises(ValueError, match="no batch dimension"):
            with adapter_per_sample(model, ["b"] * 12):
                model(x[0])


class TestFiles:
    """PEFT's multi-adapter layout: "default" at the root, every other adapter in a subfolder of its name."""

    def test_every_adapter_is_written_and_each_loads_back_under_its_name(self, tmp_path):
        from lightning_lora import load_adapter, save_adapter

        base, model, x = two_adapters()
        folder = save_adapter(model, tmp_path / "adapters")
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "b"]
        fresh = load_adapter(copy.deepcopy(base), folder)  # "default", from the root
        load_adapter(fresh, folder, adapter_name="b")  # from folder/b, added beside it
        assert lora_adapter_names(fresh) == ["default", "b"]
        assert_same_per_adapter(fresh, model, x, ["default", "b", ["default", "b"]])
        load_adapter(fresh, folder, adapter_name="b")  # again: the values replaced, nothing added

    def test_saving_rewrites_only_the_adapters_saved_and_keeps_the_folder_s_others(self, tmp_path):
        from lightning_lora import save_adapter

        _, model, _ = two_adapters()
        inject_lora(model, LoRAConfig(rank=2, target_modules=["fc1"]), adapter_name="c")
        save_adapter(model, tmp_path / "out")
        assert {p.name for p in (tmp_path / "out").iterdir() if p.is_dir()} == {"b", "c"}
        files = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
        with torch.no_grad():
            model.fc1.lora_adapters["c"].lora_B.add_(1.0)
        save_adapter(model, tmp_path / "out", adapter_names="c")  # one name as a string, not its letters
        changed = {p for p, data in files.items() if p.read_bytes() != data}
        assert changed == {tmp_path / "out" / "c" / "adapter_model.safetensors"}  # PEFT's selected_adapters
        assert set((tmp_path / "out").rglob("*")) == set(files) | {tmp_path / "out" / "b", tmp_path / "out" / "c"}
        delete_adapter(model, "b")
        save_adapter(model, tmp_path / "out")  # every adapter the model holds; "b", saved earlier, stays
        assert (tmp_path / "out" / "b" / "adapter_model.safetensors").read_bytes() == files[
            tmp_path / "out" / "b" / "adapter_model.safetensors"]  # fmt: skip
        with pytest.raises(ValueError, match="no adapter named 'zz'"):
            save_adapter(model, tmp_path / "out", adapter_names=["zz"])
        with pytest.raises(ValueError, match="adapter_names must be a list of adapter names"):
            save_adapter(model, tmp_path / "out", adapter_names=[3])

    def test_a_name_the_folder_lacks_is_refused_listing_its_adapters(self, tmp_path):
        from lightning_lora import load_adapter, save_adapter

        base, model, x = two_adapters()
        save_adapter(model, tmp_path / "both")
        with pytest.raises(ValueError, match=r"holds adapters \['default', 'b'\], none named 'c'"):
            load_adapter(copy.deepcopy(base), tmp_path / "both", adapter_name="c")
        save_adapter(model, tmp_path / "only_b", adapter_names=["b"])
        with pytest.raises(ValueError, match=r"no adapter at its root, only \['b'\] in subfolders"):
            load_adapter(copy.deepcopy(base), tmp_path / "only_b")
        (tmp_path / "both" / "b" / "adapter_config.json").write_text("{")  # damaged: not skipped for the root
        with pytest.raises(ValueError, match="both/b"):
            load_adapter(copy.deepcopy(base), tmp_path / "both", adapter_name="b")
        fresh = load_adapter(copy.deepcopy(base), tmp_path / "only_b", adapter_name="digit4", subfolder="b")
        single = load_adapter(copy.deepcopy(base), tmp_path / "only_b" / "b", adapter_name="digit4")  # a lone root
        with torch.no_grad(), use_adapters(model, "b"):
            assert torch.equal(fresh(x), model(x)) and torch.equal(single(x), model(x))
        with pytest.raises(ValueError, match="subfolder must be an adapter's folder name"):
            load_adapter(copy.deepcopy(base), tmp_path / "only_b", subfolder="../x")

    def test_a_folder_holding_anything_else_is_not_replaced(self, tmp_path):
        from lightning_lora import save_adapter

        _, model, _ = two_adapters()
        (tmp_path / "out" / "b").mkdir(parents=True)
        (tmp_path / "out" / "b" / "notes.txt").write_text("mine")
        with pytest.raises(Exception, match="is not an adapter folder: it holds b"):
            save_adapter(model, tmp_path / "out")
        assert (tmp_path / "out" / "b" / "notes.txt").read_text() == "mine"
        save_adapter(model, tmp_path / "kept")
        (tmp_path / "kept" / "b" / "notes.txt").write_text("mine")  # inside an adapter's subfolder: named
        with pytest.raises(Exception, match="is not an adapter folder: it holds b/notes.txt. Nothing was written"):
            save_adapter(model, tmp_path / "kept")

    def test_peft_loads_what_we_write_and_we_load_what_peft_writes(self, tmp_path):
        from lightning_lora import load_adapter, save_adapter

        peft = require("peft")
        base, model, x = two_adapters()
        model.eval()
        save_adapter(model, tmp_path / "ours")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        theirs.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
        theirs.eval()
        with torch.no_grad():
            for names in ("default", "b"):
                set_active_adapters(model, names)
                theirs.set_adapter(names)
                torch.testing.assert_close(theirs(x), model(x), atol=1e-6, rtol=1e-6)
        theirs.save_pretrained(tmp_path / "theirs")  # PEFT's own multi-adapter layout
        back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
        load_adapter(back, tmp_path / "theirs", adapter_name="b")
        assert_same_per_adapter(back, model, x, ["default", "b"], atol=1e-6)

    def test_a_failed_load_of_a_further_adapter_leaves_the_model_as_it_was(self, tmp_path):
        from lightning_lora import load_adapter, save_adapter

        _, model, x = two_adapters()
        other = inject_lora(nn.Sequential(nn.Linear(3, 3)), LoRAConfig(rank=2))
        save_adapter(other, tmp_path / "other")
        keys, out = set(model.state_dict()), model(x)
        with pytest.raises(ValueError):
            load_adapter(model, tmp_path / "other", adapter_name="c", check_base=False)
        assert set(model.state_dict()) == keys and torch.equal(model(x), out)
        assert lora_adapter_names(model) == ["default", "b"]


def test_per_sample_serving_works_on_a_model_cast_to_bfloat16_after_injection():
    """What Lightning's bf16-true does: base and adapters in bfloat16; each sample as it alone would be."""
    _, model, x = two_adapters()
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    routing = ["default", "b", "__base__", "b", "default", "__base__"]
    with torch.no_grad():
        with adapter_per_sample(model, routing):
            mixed = model(x)
        for i, name in enumerate(routing):
            if name == "__base__":
                with disable_lora(model):
                    expected = model(x[i : i + 1])
            else:
                expected = set_active_adapters(model, name)(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], expected, atol=2e-2, rtol=2e-2)  # bfloat16 rounding
