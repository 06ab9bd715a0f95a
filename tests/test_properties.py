"""Property tests: the LoRA invariants over random shapes, ranks, alphas, dtypes and DoRA."""

from __future__ import annotations

import copy
import tempfile

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, load_adapter, merge_lora, save_adapter, unmerge_lora

layers = st.fixed_dictionaries(
    {
        "in_features": st.integers(1, 24),
        "out_features": st.integers(1, 24),
        "rank": st.integers(1, 8),
        "alpha": st.floats(0.1, 32.0),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16]),
        "use_dora": st.booleans(),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def adapted_pair(p: dict) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(p["seed"])
    base = nn.Sequential(nn.Linear(p["in_features"], p["out_features"], bias=p["bias"], dtype=p["dtype"]))
    x = torch.randn(5, p["in_features"], dtype=p["dtype"])
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=p["rank"], alpha=p["alpha"], use_dora=p["use_dora"]))
    return base, model, x


def perturb(model: nn.Module) -> None:
    """Give the adapter trained-looking values (B away from zero, magnitudes moved)."""
    with torch.no_grad():
        layer = model[0]
        layer.lora_B.normal_(std=0.5)
        if layer.config.use_dora:
            layer.lora_magnitude.mul_(1.0 + 0.1 * torch.randn_like(layer.lora_magnitude))


def tolerance(reference: torch.Tensor, model: nn.Module | None = None) -> float:
    # bf16 keeps 8 bits of mantissa: a merged bf16 weight is off by up to ~2**-8 relative,
    # summed over the input features; fp32 merges agree to ~1e-6 relative.
    relative = 3e-2 if reference.dtype == torch.bfloat16 else 1e-5
    return relative * (1.0 + reference.float().abs().max().item()) * dora_conditioning(model)


def dora_conditioning(model: nn.Module | None) -> float:
    """max ||W|| / ||W + s B A|| over the rows: how much DoRA's renormalisation amplifies rounding.

    When the trained direction nearly cancels the base row, ``m / ||V||`` is huge and the
    unmerged form ``(m/||V|| - 1) W x + m/||V|| s B A x`` subtracts large, nearly equal terms
    (PEFT computes the same form); the merged weight is rounded differently. No formulation
    avoids this in fp32; the README states the condition.
    """
    if model is None or not model[0].config.use_dora:
        return 1.0
    layer = model[0]
    with torch.no_grad():
        weight = layer.base_weight().double()
        direction = weight + layer.lora_weight(layer.primary).double() * layer.scale
        ratio = weight.norm(dim=1) / direction.norm(dim=1).clamp_min(1e-30)
    return max(1.0, float(ratio.max()))


@settings(max_examples=40, deadline=None)
@given(layers)
def test_injected_model_equals_its_base_at_init(p):
    base, model, x = adapted_pair(p)
    assert torch.equal(model(x), base(x))


@example(
    dict(in_features=1, out_features=2, rank=3, alpha=19.5, dtype=torch.float32, use_dora=True, bias=False, seed=7371)
)  # fmt: skip  (an outside tester's case: a row of W + s B A nearly cancels)
@settings(max_examples=40, deadline=None)
@given(layers)
def test_merge_equals_unmerged_and_unmerge_restores_the_weights(p):
    _, model, x = adapted_pair(p)
    perturb(model)
    weight = model[0].weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        unmerge_lora(model)
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=tolerance(unmerged, model), rtol=0)
    assert torch.equal(model[0].weight, weight)
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


@settings(max_examples=25, deadline=None)
@given(layers)
def test_save_and_load_round_trip_is_bit_identical(p):
    base, model, x = adapted_pair(p)
    perturb(model)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder + "/adapter")
        restored = load_adapter(copy.deepcopy(base), folder + "/adapter")
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
