"""adapter_stats: each layer's update size and spectrum, checked against a full SVD of the update it adds."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DORA_KINDS, LAYER_ZOO, zoo_model
from torch import nn

from lightning_lora import LoRAConfig, LoRAConv, adapter_stats, inject_lora, lora_layers, merge_lora


def full_svd_of_the_update(layer) -> torch.Tensor:
    """The reference: the update laid out as the layer's operator (block per group), then a full SVD."""
    delta = (layer.lora_weight(layer.primary) * layer.scale).detach()
    if isinstance(layer, LoRAConv):
        blocks = delta.reshape(layer.groups, delta.shape[0] // layer.groups, -1)
        return torch.cat([torch.linalg.svdvals(block) for block in blocks]).sort(descending=True).values
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))


@pytest.mark.parametrize("kind", list(LAYER_ZOO))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_numbers_equal_a_full_svd_of_the_update_for_every_layer_type(kind, dora):
    if dora and kind not in DORA_KINDS:
        pytest.skip("DoRA is not defined for this layer type")
    base, _ = zoo_model(kind)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=3, alpha=5, target_modules=["layer"], use_dora=dora))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    stats = {s.name: s for s in adapter_stats(model)}
    assert set(stats) == {name for name, _ in lora_layers(model)}
    for name, layer in lora_layers(model):
        want = full_svd_of_the_update(layer)
        got = torch.tensor(stats[name].singular_values)
        torch.testing.assert_close(got, want[: len(got)], rtol=1e-4, atol=1e-5)
        assert float(want[len(got) :].abs().sum()) < 1e-4  # nothing beyond the rank(s)
        with torch.no_grad():
            ratio = torch.linalg.vector_norm(layer.lora_weight(layer.primary) * layer.scale) / torch.linalg.vector_norm(
                layer.base_weight()
            )
        assert stats[name].delta_norm_ratio == pytest.approx(float(ratio), rel=1e-4)
        assert stats[name].rank == 3 and stats[name].adapter == "default"
    merge_lora(model)  # merged: the same numbers (the base weight is the one kept aside)
    assert [s.delta_norm_ratio for s in adapter_stats(model)] == pytest.approx(
        [s.delta_norm_ratio for s in stats.values()], rel=1e-6
    )


def test_effective_rank_tells_a_collapsed_adapter_from_a_full_one():
    model = inject_lora(nn.Sequential(nn.Linear(16, 16)), LoRAConfig(rank=4, target_modules=["0"]))
    (fresh,) = adapter_stats(model)
    assert fresh.delta_norm_ratio == 0 and fresh.effective_rank == 0  # B starts at zero
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(4, 16))
        layer.lora_B.copy_(torch.eye(16, 4))  # four equal directions
    assert adapter_stats(model)[0].effective_rank == pytest.approx(4.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.zeros(16, 4))
        layer.lora_B[:, 0] = 1.0  # every direction but one gone
    (collapsed,) = adapter_stats(model)
    assert collapsed.effective_rank == pytest.approx(1.0) and collapsed.singular_values[1] == pytest.approx(0, abs=1e-6)


def test_a_zero_base_weight_gives_an_infinite_ratio_not_an_error():
    linear = nn.Linear(4, 4)
    nn.init.zeros_(linear.weight)
    model = inject_lora(nn.Sequential(linear), LoRAConfig(rank=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)
    assert adapter_stats(model)[0].delta_norm_ratio == float("inf")
