"""torch.compile(fullgraph=True) of injected models: no graph breaks, eager's numbers, every rank and batch."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DORA_KINDS, LAYER_ZOO, Single, zoo_model
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, save_adapter
from lightning_lora.core.layers import fast_path


def adapted(kind: str, rank: int, use_dora: bool = False) -> tuple[nn.Module, torch.Tensor]:
    base, x = zoo_model(kind)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=rank, target_modules=["layer"], use_dora=use_dora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.3)
    return model, x


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach(), {
        n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_matches_eager(model: nn.Module, x: torch.Tensor, backend: str = "aot_eager") -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, grads = forward_backward(compiled, x)
    eager_out, eager_grads = forward_backward(model, x)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", LAYER_ZOO)
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_every_layer_type_compiles_whole_at_every_rank(kind, rank):
    assert_matches_eager(*adapted(kind, rank))


@pytest.mark.parametrize("kind", DORA_KINDS)
def test_dora_compiles_whole(kind):
    assert_matches_eager(*adapted(kind, 4, use_dora=True))


@pytest.mark.parametrize(("rank", "batch"), [(4, 300), (8, 2), (64, 512)])
def test_linear_where_the_cpu_fast_path_would_run_steps_aside(rank, batch, monkeypatch):
    """The fast path (a custom autograd Function) cannot be captured whole; compiled code never takes it."""
    calls = []
    original = fast_path._AddLowRankUpdate.apply
    monkeypatch.setattr(fast_path._AddLowRankUpdate, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = inject_lora(Single(nn.Linear(32, 24)).requires_grad_(False), LoRAConfig(rank=rank))
    assert_matches_eager(model, torch.randn(batch, 32))
    assert model(torch.randn(batch, 32)).shape == (batch, 24)  # eager still uses it where measured faster
    assert (len(calls) > 0) == (rank <= 8 or batch >= 256)


def test_a_transformer_encoder_layer_compiles_whole():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    model = inject_lora(nn.Sequential(layer).requires_grad_(False), LoRAConfig(rank=2))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert_matches_eager(model, torch.randn(2, 5, 8))


def test_inductor_end_to_end():
    torch.manual_seed(0)
    model = inject_lora(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).requires_grad_(False), LoRAConfig(rank=4)
    )
    assert_matches_eager(model, torch.randn(64, 16), backend="inductor")


def test_an_adapter_saved_from_a_compiled_model_loads_onto_the_plain_one(tmp_path):
    from lightning_lora import load_adapter, lora_state_dict

    model, x = adapted("linear", 2)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)
    save_adapter(compiled, tmp_path / "a")
    plain = load_adapter(zoo_model("linear")[0], tmp_path / "a")
    assert lora_state_dict(plain).keys() == {"layer.lora_adapters.default.lora_A", "layer.lora_adapters.default.lora_B"}
    assert torch.equal(plain(x), model(x))
