"""Weighted combinations of adapters: PEFT's add_weighted_adapter ("linear", "cat", "svd") as the reference.

Tolerances: 1e-5 on outputs against PEFT; "cat" and a full-rank "svd" are also checked to equal the
weighted sum of the sources' updates exactly (to 1e-5), on every layer type, grouped convolutions
included (which PEFT cannot combine).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LAYER_ZOO, TwoLinear, move_adapters, require, zoo_model
from torch import nn

from lightning_lora import (
    LoRAConfig,
    add_weighted_adapter,
    disable_lora,
    get_lora_config,
    inject_lora,
    lora_adapter_names,
    lora_layers,
    set_active_adapters,
)

KINDS = list(LAYER_ZOO)


def with_two(base: nn.Module, targets, rank_b: int = 2, seed: int = 1) -> nn.Module:
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, alpha=4, target_modules=targets))
    inject_lora(model, LoRAConfig(rank=rank_b, alpha=3, target_modules=targets), adapter_name="b")
    return move_adapters(model, seed)


def update_of(model: nn.Module, x: torch.Tensor, names) -> torch.Tensor:
    set_active_adapters(model, names)
    with torch.no_grad():
        out = model(x)
        with disable_lora(model):
            return out - model(x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_exact_combinations_equal_the_weighted_sum_of_the_updates_on_every_layer_type(kind, combination):
    base, x = zoo_model(kind)
    model = with_two(base, ["layer"], rank_b=3)
    weights = [0.7, -1.3]
    expected = weights[0] * update_of(model, x, "default") + weights[1] * update_of(model, x, "b")
    rank = {"svd": 5, "cat": None}[combination]  # 5: the sum's full rank, so the truncation is exact
    add_weighted_adapter(model, ["default", "b"], weights, "mix", combination=combination, svd_rank=rank)
    assert lora_adapter_names(model) == ["default", "b", "mix"]
    if kind.startswith("attention"):  # attention is not linear in its projections: compare the projections
        for _, layer in lora_layers(model):
            combined = 0.7 * layer.delta_weight("default") - 1.3 * layer.delta_weight("b")
            torch.testing.assert_close(layer.delta_weight("mix"), combined, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(update_of(model, x, "mix"), expected, atol=1e-5, rtol=1e-5)


def test_the_new_adapter_is_inactive_frozen_and_the_sources_unchanged():
    model = with_two(TwoLinear(), "all-linear")
    x = torch.randn(4, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "mix", combination="cat")
    assert torch.equal(model(x), out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    assert get_lora_config(model, "mix").rank == 4 and get_lora_config(model, "mix").scale == 1.0


class TestAgainstPEFT:
    @pytest.mark.parametrize(("combination", "rank_b"), [("linear", 2), ("cat", 2), ("cat", 3), ("svd", 3)])
    def test_outputs_equal_peft_s_add_weighted_adapter(self, combination, rank_b):
        peft = require("peft")
        base = TwoLinear().requires_grad_(False)
        x = torch.randn(5, 12)
        ours = with_two(base, ["fc1", "fc2"], rank_b=rank_b)
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
        )
        theirs.add_adapter("b", peft.LoraConfig(r=rank_b, lora_alpha=3, target_modules=["fc1", "fc2"]))
        with torch.no_grad():
            for name, layer in lora_layers(ours):
                peft_layer = theirs.base_model.model.get_submodule(name)
                for adapter_name, adapter in layer.lora_adapters.items():
                    peft_layer.lora_A[adapter_name].weight.copy_(adapter.lora_A)
                    peft_layer.lora_B[adapter_name].weight.copy_(adapter.lora_B)
        weights = [0.6, -0.9]
        add_weighted_adapter(ours, ["default", "b"], weights, "mix", combination=combination)
        theirs.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination)
        set_active_adapters(ours, "mix")
        theirs.set_adapter("mix")
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: add_weighted_adapter(m, ["default", "zz"], [1, 1], "mix"), "no adapter named 'zz'"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1], "mix"), "2 adapters but 1 weights"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, float("nan")], "mix"), "finite numbers"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, 1], "b"), "already holds an adapter named 'b'"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, 1], "mix", "linear"), "needs one rank.*'cat'"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, 1], "mix", "ties"), "must be one of"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, 1], "mix", "cat", svd_rank=2), "'svd' only"),
        (lambda m: add_weighted_adapter(m, ["default", "c"], [1, 1], "mix", "cat"), "does not adapt layer 'fc2'"),
        (lambda m: add_weighted_adapter(m, "default", [1], "mix"), "adapters must be a list"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, 1], "mix", "svd", 10**9), "exceeds 5, the ranks"),
        (lambda m: add_weighted_adapter(m, ["default"], 1.0, "mix"), "weights must be a list"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, "2"], "mix", "cat"), "finite numbers"),
    ],
)
def test_bad_combinations_are_refused_with_the_fix_and_the_model_unchanged(call, message):
    model = with_two(TwoLinear(), "all-linear", rank_b=3)
    inject_lora(model, LoRAConfig(rank=2, target_modules=["fc1"]), adapter_name="c")
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=message):
        call(model)
    assert set(model.state_dict()) == keys and lora_adapter_names(model) == ["default", "b", "c"]


def test_dora_adapters_are_refused():
    model = inject_lora(TwoLinear(), LoRAConfig(rank=2, use_dora=True))
    inject_lora(model, LoRAConfig(rank=2), adapter_name="b")
    with pytest.raises(ValueError, match="DoRA adapter, whose magnitudes do not combine"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "mix")


def test_weights_may_be_numpy_scalars_or_zero_dim_tensors():
    import numpy as np

    model = with_two(TwoLinear(), "all-linear", rank_b=3)
    add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "plain", "cat")
    add_weighted_adapter(model, ["default", "b"], np.array([0.5, 2.0], dtype=np.float32), "array", "cat")
    add_weighted_adapter(model, ["default", "b"], [np.float64(0.5), torch.tensor(2.0)], "scalars", "cat")
    x = torch.randn(3, TwoLinear().fc1.in_features)
    with torch.no_grad():
        outs = [set_active_adapters(model, n)(x) for n in ("plain", "array", "scalars")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
