"""Model surgery: targets, injection, freezing, ties, merge/unload, disable, bias policies, wrappers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import Conv1DLike
from torch import nn

from lightning_lora import (
    LoRAConfig,
    LoRAConv,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    LoRAMultiheadAttention,
    ModuleToSave,
    base_state_dict,
    count_parameters,
    disable_lora,
    find_targets,
    get_lora_config,
    inject_lora,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    plan_targets,
    unmerge_lora,
    unwrap_model,
)
from lightning_lora.core.config import matches


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.encoder(x))))


class Mixed(nn.Module):
    """One of every kind: what "all-linear" takes and what it leaves, plus a tied output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = Conv1DLike(8, 8)
        self.mlp = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in GPT-2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp(self.proj(h.contiguous()))
        return self.lm_head(h)


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False)


def train(model: nn.Module, x: torch.Tensor, steps: int = 5) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


X = torch.randn(10, 6)
IDS = torch.randint(0, 16, (2, 5))


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


class TestAllLinear:
    def test_takes_linear_conv1d_and_attention_and_says_what_it_leaves(self, caplog):
        model = Mixed()
        with caplog.at_level(logging.INFO, logger="lightning_lora"):
            inject_lora(model, LoRAConfig(rank=2))
        assert isinstance(model.attn, LoRAMultiheadAttention) and isinstance(model.attn.out_proj, LoRALinear)
        assert isinstance(model.mlp, LoRALinear) and type(model.proj).__name__ == "LoRAConv1D"
        assert type(model.conv) is nn.Conv1d and type(model.embed) is nn.Embedding
        assert type(model.lm_head) is nn.Linear  # tied to the input embedding: left out, as in PEFT
        lines = [r.getMessage() for r in caplog.records if r.name == "lightning_lora"]
        assert len(lines) == 1
        assert "embed (Embedding: name it to adapt it)" in lines[0] and "conv (Conv1d" in lines[0]
        assert "lm_head (output layer tied to embed.weight" in lines[0]

    def test_convs_and_embeddings_when_named(self):
        model = Mixed()
        inject_lora(model, LoRAConfig(rank=2, target_modules=["conv", "embed"]))
        assert isinstance(model.conv, LoRAConv) and isinstance(model.embed, LoRAEmbedding)


class TestTargetErrors:
    def test_pattern_matching_nothing_lists_the_adaptable_layers(self):
        expected = r"pattern 'fc9' matches no module.*\['encoder.0', 'encoder.2', 'head'\]"
        with pytest.raises(ValueError, match=expected):
            inject_lora(tiny(), LoRAConfig(target_modules=["fc9"]))
        with pytest.raises(ValueError, match="exclude_modules pattern 'nope' matches no module"):
            inject_lora(tiny(), LoRAConfig(exclude_modules=["nope"]))

    def test_a_named_module_that_cannot_be_adapted_is_named_with_its_type(self):
        with pytest.raises(ValueError, match="LoRA target 'encoder.1' is a ReLU, which LoRA cannot adapt"):
            inject_lora(tiny(), LoRAConfig(target_modules=["encoder.1"]))
        with pytest.raises(ValueError, match="'norm' is a LayerNorm, which LoRA cannot adapt.*Adaptable types"):
            inject_lora(tiny(), LoRAConfig(target_modules=["norm"]))

    def test_a_glob_sweeps_containers_and_parameter_free_modules(self):
        assert set(find_targets(tiny(), LoRAConfig(target_modules=["encoder.*"]))) == {"encoder.0", "encoder.2"}

    def test_everything_excluded(self):
        with pytest.raises(ValueError, match="selects no layer to adapt"):
            inject_lora(tiny(), LoRAConfig(target_modules=["head"], exclude_modules=["head"]))

    def test_a_failed_injection_changes_nothing(self):
        model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4))
        with pytest.raises(ValueError, match="DoRA is defined for"):
            inject_lora(model, LoRAConfig(target_modules=["0", "1"], use_dora=True))
        assert all(p.requires_grad for p in model.parameters())
        assert get_lora_config(model) is None and type(model[0]) is nn.Linear


class TestStructure:
    def test_excluding_a_container_excludes_everything_inside(self):
        plan = plan_targets(tiny(), LoRAConfig(exclude_modules=["encoder"]))
        assert set(plan.targets) == {"head"}
        assert plan.skipped == {"encoder.0": "excluded", "encoder.2": "excluded"}

    def test_a_module_registered_under_two_names_is_adapted_once_for_both(self):
        shared = nn.Linear(4, 4)
        model = nn.Sequential(shared, nn.ReLU(), shared)
        base = frozen_copy(model)
        x = torch.randn(3, 4)
        inject_lora(model, LoRAConfig(rank=2, target_modules=["2"]))  # named by its second name
        assert model[0] is model[2] and isinstance(model[0], LoRALinear)
        assert count_parameters(model).trainable == 2 * (4 + 4)
        train(model, x)
        with torch.no_grad():
            expected = model[2](torch.relu(model[0](x)))  # the adapter runs at both calls
            assert torch.equal(model(x), expected)
            with disable_lora(model):
                assert torch.equal(model(x), base(x))
            merge_lora(model)
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)

    def test_rank_and_alpha_patterns(self):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2, alpha=2, rank_pattern={"head": 5}, alpha_pattern={"encoder.*": 8}))
        assert (model.head.rank, model.head.scale) == (5, 2 / 5)
        assert (model.encoder[0].rank, model.encoder[0].scale) == (2, 4.0)

    def test_idempotent_with_the_same_config_refuses_another(self):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2))
        layer = model.head
        assert inject_lora(model, LoRAConfig(rank=2)) is model and model.head is layer
        with pytest.raises(ValueError, match="already holds an adapter named .default. made with"):
            inject_lora(model, LoRAConfig(rank=3))
        with pytest.raises(ValueError, match="needs a container module"):
            inject_lora(nn.Linear(2, 2), LoRAConfig())

    def test_richboynet_sized_trainable_count(self):
        model = nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))
        inject_lora(model, LoRAConfig(rank=1, alpha=1))
        count = count_parameters(model)
        assert count.trainable == 6_794 and count.total == 2_807_010 + 6_794
        assert str(count) == "trainable params: 6,794 || all params: 2,813,804 || trainable%: 0.2415"


class TestTiedWeights:
    @pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "embed"]])
    def test_merging_never_changes_a_shared_tensor(self, targets):
        model = Mixed()
        base = frozen_copy(model)
        shared = model.embed.weight
        inject_lora(model, LoRAConfig(rank=2, target_modules=targets))
        train(model, IDS)
        model.eval()
        with torch.no_grad():
            unmerged = model(IDS)
            merge_lora(model)
            torch.testing.assert_close(model(IDS), unmerged, atol=1e-5, rtol=1e-5)
            with disable_lora(model):
                assert torch.equal(model(IDS), base.eval()(IDS))
            unmerge_lora(model)
        assert model.lm_head.weight is shared and model.embed.weight is shared
        plain = merge_and_unload(model)
        if targets == ["lm_head"]:
            assert plain.embed.weight is shared  # the merged output layer got its own copy
        torch.testing.assert_close(plain(IDS), unmerged, atol=1e-5, rtol=1e-5)
        assert torch.equal(shared, base.embed.weight)


class TestBiasPolicies:
    @pytest.mark.parametrize(
        ("bias", "expected"),
        [
            ("none", set()),
            ("lora_only", {"encoder.0.bias", "head.bias"}),
            ("all", {"encoder.0.bias", "encoder.2.bias", "norm.bias", "head.bias"}),
        ],
    )
    def test_trained_biases_are_kept_beside_the_base_values(self, bias, expected):
        model = tiny()
        base = frozen_copy(model)
        inject_lora(model, LoRAConfig(target_modules=["encoder.0", "head"], bias=bias))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        assert trainable == expected and expected <= set(lora_state_dict(model))
        train(model, X)
        with torch.no_grad():
            with disable_lora(model):
                assert torch.equal(model(X), base(X))
            merge_lora(model)
            with disable_lora(model):
                assert torch.equal(model(X), base(X))
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_state_dict(model).items())
        assert set(base_state_dict(model)) == set(base.state_dict())

    def test_modules_to_save_trains_an_untied_copy(self):
        model = tiny()
        base = frozen_copy(model)
        inject_lora(model, LoRAConfig(target_modules=["encoder.0"], modules_to_save=["head"]))
        assert isinstance(model.head, ModuleToSave)
        factors = {"encoder.0.lora_adapters.default.lora_A", "encoder.0.lora_adapters.default.lora_B"}
        adapter = factors | {"head.trained_module.weight", "head.trained_module.bias"}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter == set(lora_state_dict(model))
        train(model, X)
        with disable_lora(model):
            assert torch.equal(model(X), base(X))
        assert set(base_state_dict(model)) == set(base.state_dict())

    def test_lora_state_dict_is_structural_not_by_substring(self):
        model = nn.Sequential()
        model.add_module("lora_head", nn.Linear(4, 4))
        model.add_module("fc", nn.Linear(4, 4))
        inject_lora(model, LoRAConfig(target_modules=["fc"]))
        assert set(lora_state_dict(model)) == {"fc.lora_adapters.default.lora_A", "fc.lora_adapters.default.lora_B"}


class TestMergeAndDisable:
    @pytest.mark.parametrize("use_dora", [False, True])
    def test_merge_and_unload_gives_plain_layers_with_the_same_outputs(self, use_dora):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2, use_dora=use_dora, modules_to_save=["head"], bias="all"))
        train(model, X)
        with torch.no_grad():
            adapted = model(X)
        plain = merge_and_unload(model)
        assert not any(isinstance(m, (LoRALayer, ModuleToSave)) for m in plain.modules())
        assert not any("lora" in n for n, _ in plain.named_buffers())
        assert get_lora_config(plain) is None and set(plain.state_dict()) == set(tiny().state_dict())
        torch.testing.assert_close(plain(X), adapted, atol=1e-5, rtol=0)

    def test_disable_restores_state_on_exceptions(self):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2, bias="all"))
        train(model, X)
        trained = model(X).detach()
        with pytest.raises(RuntimeError, match="boom"), disable_lora(model):
            raise RuntimeError("boom")
        assert all(m.enabled for m in model.modules() if isinstance(m, LoRALayer))
        assert torch.equal(model(X).detach(), trained)


class TestWrappers:
    def test_compiled_ddp_and_fabric_style_wrappers_are_seen_through(self):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2))
        keys = set(lora_state_dict(model))

        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1)
        wrapped = [torch.compile(model), nn.DataParallel(model), fabric.setup_module(torch.compile(model))]
        for wrapper in wrapped:
            assert unwrap_model(wrapper) is model
            assert set(lora_state_dict(wrapper)) == keys
            assert get_lora_config(wrapper) == LoRAConfig(rank=2)


def test_the_core_imports_without_lightning():
    import subprocess
    import sys

    code = "import sys, lightning_lora, lightning_lora.core.inject; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    code = "import lightning_lora; print(lightning_lora.LoRAInjectionCallback.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "LoRAInjectionCallback"


class TestWhatAStrangerFound:
    """Cases an outside tester broke once; each must stay fixed."""

    @pytest.mark.parametrize("bias", ["lora_only", "all"])
    def test_remove_lora_restores_every_trained_bias(self, bias):
        model = tiny()
        base = frozen_copy(model)
        inject_lora(model, LoRAConfig(rank=2, bias=bias))
        train(model, X)
        from lightning_lora import remove_lora

        remove_lora(model)
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(X), base(X))

    def test_a_module_to_save_passes_attributes_through(self):
        model = tiny()
        inject_lora(model, LoRAConfig(rank=2, target_modules=["encoder.0"], modules_to_save=["norm", "head"]))
        assert model.norm.eps == 1e-5 and model.head.out_features == 3
        assert model.head.weight is model.head.trained_module.weight
        with disable_lora(model):
            assert model.head.weight is model.head.original_module.weight

    def test_a_glob_over_blocks_sweeps_their_norms(self):
        model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4)))
        assert set(find_targets(model, LoRAConfig(target_modules=["0.*"]))) == {"0.0"}

    def test_a_rank_pattern_that_matches_no_adapted_layer_is_an_error(self):
        with pytest.raises(ValueError, match="rank_pattern pattern 'heda' matches no adapted layer"):
            inject_lora(tiny(), LoRAConfig(rank_pattern={"heda": 4}))

    def test_patterns_see_every_name_of_a_shared_module(self):
        shared = nn.Linear(4, 4)
        model = nn.Sequential()
        model.add_module("fc", shared)
        model.add_module("alias", shared)
        inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["alias"], alpha_pattern={"alias": 16}))
        assert model.fc.scale == 8.0


def test_two_targets_sharing_one_tied_weight_are_said_to_lose_their_tie_on_merge(caplog):
    """GPT-2's lm_head is its token embedding's tensor: two updates untie them on merge, and the user is told."""
    from torch import nn

    from lightning_lora import LoRAConfig, inject_lora

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(11, 4)
            self.lm_head = nn.Linear(4, 11, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            return self.lm_head(self.wte(ids))

    with caplog.at_level("WARNING", logger="lightning_lora"):
        inject_lora(TiedLM(), LoRAConfig(rank=2, target_modules=["wte", "lm_head"]))
    assert "'wte' and 'lm_head' share one weight tensor" in caplog.text and "no longer tied" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_lora"):
        inject_lora(TiedLM(), LoRAConfig(rank=2, target_modules=["lm_head"]))  # one of them: the tie is kept
    assert "share one weight tensor" not in caplog.text
