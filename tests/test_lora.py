"""LoRALinear and LoRAConfig: the layer math, on single layers and tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_lora import LoRAConfig, LoRALinear


def make_layer(in_f=12, out_f=7, bias=True, dtype=torch.float32, **kwargs) -> tuple[nn.Linear, LoRALinear]:
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    reference = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    reference.load_state_dict(base.state_dict())
    return reference, LoRALinear(base, **kwargs)


def train_adapter(layer: LoRALinear, steps: int = 3) -> None:
    """Move the adapter away from its zero start, as training would."""
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        layer.zero_grad()
        layer(torch.randn(16, layer.in_features)).pow(2).mean().backward()
        opt.step()


def frozen(layer: LoRALinear) -> LoRALinear:
    layer.weight.requires_grad_(False)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    return layer


class TestConfig:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"rank": 0}, "rank must be an integer >= 1, got 0"),
            ({"rank": 2.5}, "rank must be an integer >= 1, got 2.5"),
            ({"rank": True}, "rank must be an integer >= 1, got True"),
            ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
            ({"alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
            ({"alpha": float("nan")}, "alpha must be a finite number > 0, got nan"),
            ({"alpha": "8"}, "alpha must be a number > 0, got '8'"),
            ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
            ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
            ({"init": "xavier"}, "init must be one of .*got 'xavier'"),
            ({"bias": "some"}, "bias must be one of .*got 'some'"),
            ({"target_modules": []}, "target_modules is empty"),
            ({"target_modules": "fc1"}, "target_modules must be a list of module-name patterns, got 'fc1'"),
            ({"target_modules": ["fc1", ""]}, "target_modules must hold non-empty strings"),
            ({"exclude_modules": "fc1"}, "exclude_modules must be a list"),
            ({"modules_to_save": [3]}, "modules_to_save must hold non-empty strings"),
            ({"use_dora": "yes"}, "use_dora must be True or False, got 'yes'"),
        ],
    )
    def test_bad_values_name_the_field_and_value(self, kwargs, message):
        with pytest.raises(ValueError, match=f"LoRAConfig.{message}"):
            LoRAConfig(**kwargs)

    def test_scale_plain_and_rslora(self):
        assert LoRAConfig(rank=4, alpha=8).scale == 2.0
        assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0

    def test_dict_round_trip_and_unknown_keys(self):
        config = LoRAConfig(rank=2, alpha=3, target_modules=("fc1",), use_dora=True)
        assert LoRAConfig.from_dict(config.to_dict()) == config
        with pytest.raises(ValueError, match=r"unknown LoRAConfig field\(s\) \['lora_r'\]"):
            LoRAConfig.from_dict({**config.to_dict(), "lora_r": 4})


class TestLoRALinear:
    def test_keeps_base_parameter_names_and_shapes(self):
        _, layer = make_layer(12, 7, rank=3)
        assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
        assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)
        assert torch.count_nonzero(layer.lora_B) == 0
        _, dora = make_layer(12, 7, rank=3, use_dora=True)
        assert set(dora.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude"}

    @pytest.mark.parametrize("use_dora", [False, True])
    @pytest.mark.parametrize("bias", [False, True])
    def test_equals_base_at_init_bit_for_bit(self, use_dora, bias):
        reference, layer = make_layer(bias=bias, rank=4, alpha=16, use_dora=use_dora)
        x = torch.randn(9, 12)
        assert torch.equal(layer(x), reference(x))

    def test_adapters_are_fp32_for_a_bf16_base(self):
        reference, layer = make_layer(dtype=torch.bfloat16, rank=2)
        assert layer.weight.dtype == torch.bfloat16
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        x = torch.randn(3, 12, dtype=torch.bfloat16)
        out = layer(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, reference(x))

    def test_scale_rslora_and_init(self):
        _, plain = make_layer(rank=4, alpha=8)
        _, rs = make_layer(rank=4, alpha=8, use_rslora=True)
        assert plain.scale == 2.0 and rs.scale == 4.0
        _, gauss = make_layer(in_f=400, rank=4, init="gaussian")
        assert abs(gauss.lora_A.std().item() - 0.25) < 0.02
        _, kaiming = make_layer(in_f=400, rank=4)
        assert kaiming.lora_A.abs().max() <= 1 / math.sqrt(400) + 1e-7  # kaiming_uniform(a=sqrt(5))

    def test_dropout_only_on_the_adapter_branch(self):
        _, layer = make_layer(rank=2, dropout=0.5)
        assert isinstance(make_layer(rank=2)[1].lora_dropout, nn.Identity)
        assert isinstance(layer.lora_dropout, nn.Dropout)
        frozen(layer).train()
        x = torch.randn(64, 12)
        with torch.no_grad():  # B = 0: whatever dropout does to x, the output is the base's
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        train_adapter(layer)
        layer.eval()
        assert torch.equal(layer(x), layer(x))

    def test_rejects_non_linear(self):
        with pytest.raises(TypeError, match="LoRALinear wraps an nn.Linear, got Conv1d"):
            LoRALinear(nn.Conv1d(2, 2, 1))

    def test_forward_never_materialises_the_full_update(self, monkeypatch):
        _, layer = make_layer(rank=2)
        train_adapter(frozen(layer))
        calls = []
        monkeypatch.setattr(LoRALinear, "_lora_product", lambda self: calls.append(1))
        layer(torch.randn(4, 12)).sum().backward()
        assert calls == []


class TestReferenceFormulations:
    """The tutorials' ways of writing LoRA give the same function, given the same A and B."""

    @pytest.fixture
    def trained(self):
        reference, layer = make_layer(20, 9, rank=3, alpha=6)
        train_adapter(frozen(layer))
        return reference, layer, torch.randn(11, 20)

    def test_weight_parametrization(self, trained):
        reference, layer, x = trained

        class AddLowRank(nn.Module):
            def forward(self, weight):
                return weight + (layer.lora_B @ layer.lora_A) * layer.scale

        parametrize.register_parametrization(reference, "weight", AddLowRank())
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)

    def test_x_a_b_layer(self, trained):
        reference, layer, x = trained
        expected = reference(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scale
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

    def test_merged_weight_layer(self, trained):
        reference, layer, x = trained
        weight = reference.weight + layer.scale * layer.lora_B @ layer.lora_A
        torch.testing.assert_close(layer(x), F.linear(x, weight, reference.bias), atol=1e-5, rtol=1e-5)


class TestGradients:
    @pytest.mark.parametrize("use_dora", [False, True])
    def test_only_adapters_get_gradients_and_base_stays_put(self, use_dora):
        _, layer = make_layer(rank=2, use_dora=use_dora)
        frozen(layer)
        weight, bias = layer.weight.clone(), layer.bias.clone()
        train_adapter(layer)
        grads = {n for n, p in layer.named_parameters() if p.grad is not None}
        expected = {"lora_A", "lora_B"} | ({"lora_magnitude"} if use_dora else set())
        assert grads == expected
        assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
        assert torch.count_nonzero(layer.lora_B) > 0

    def test_dora_norm_is_detached(self):
        _, layer = make_layer(rank=2, use_dora=True)
        train_adapter(frozen(layer))
        layer.zero_grad(set_to_none=True)
        factor = layer._dora_factor(layer.weight)
        assert factor.grad_fn is not None  # through the magnitude only
        factor.sum().backward()
        assert layer.lora_B.grad is None or torch.count_nonzero(layer.lora_B.grad) == 0


class TestMerge:
    @pytest.mark.parametrize("use_dora", [False, True])
    @pytest.mark.parametrize("bias", [False, True])
    def test_merged_equals_unmerged_and_unmerge_restores(self, use_dora, bias):
        _, layer = make_layer(bias=bias, rank=3, alpha=5, use_dora=use_dora)
        train_adapter(frozen(layer))
        x = torch.randn(8, 12)
        with torch.no_grad():
            unmerged = layer(x)
            original = layer.weight.clone()
            layer.merge()
            assert layer.merged
            torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
            merged_weight = layer.weight.clone()
            layer.merge()  # idempotent
            assert torch.equal(layer.weight, merged_weight)
            torch.testing.assert_close(layer.weight, original + layer.delta_weight(), atol=1e-6, rtol=0)
            layer.unmerge()
            assert not layer.merged
            torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=0)
            layer.unmerge()  # no-op
            torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=0)

    def test_merged_forward_skips_the_adapter_branch(self):
        _, layer = make_layer(rank=2)
        train_adapter(frozen(layer))
        layer.merge()
        x = torch.randn(3, 12)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))

    def test_merge_runs_in_fp32_under_autocast(self):
        _, layer = make_layer(64, 32, rank=4)
        train_adapter(frozen(layer))
        x = torch.randn(8, 64)
        with torch.no_grad():
            unmerged = layer(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer.merge()
            merged = layer(x)
        error = (merged - unmerged).abs().max() / unmerged.abs().max()
        assert error <= 1e-5

    def test_state_dict_of_a_merged_layer_reports_the_base_weight(self):
        _, layer = make_layer(rank=2)
        train_adapter(frozen(layer))
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.merge()
        after = layer.state_dict()
        assert torch.equal(after["weight"], before["weight"])
        with pytest.raises(RuntimeError, match="call unmerge_lora"):
            layer.load_state_dict(before)

    def test_delta_weight_of_lora(self):
        _, layer = make_layer(rank=2, alpha=4)
        train_adapter(frozen(layer))
        expected = (layer.lora_B @ layer.lora_A) * 2.0
        torch.testing.assert_close(layer.delta_weight(), expected.detach())


class TestAutocast:
    def test_bf16_autocast_forward_keeps_adapters_fp32(self):
        _, layer = make_layer(64, 32, rank=4)
        train_adapter(frozen(layer))
        x = torch.randn(8, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            out.float().pow(2).mean().backward()
        assert out.dtype == torch.bfloat16
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        assert layer.lora_A.grad.dtype == torch.float32
        with torch.no_grad():
            fp32 = layer(x)
        torch.testing.assert_close(out.float(), fp32, atol=0.1, rtol=0.05)


class TestFastPath:
    """The custom autograd Functions (full-precision path) against autograd's own derivatives."""

    def test_gradcheck_through_the_layer_with_nd_input_and_trainable_bias(self):
        from torch.func import functional_call

        layer = LoRALinear(nn.Linear(5, 3).double(), rank=2, alpha=3).double()
        params = {
            "weight": layer.weight.detach().clone().requires_grad_(),
            "bias": layer.bias.detach().clone().requires_grad_(),
            "lora_A": layer.lora_A.detach().double().clone().requires_grad_(),
            "lora_B": torch.randn(3, 2, dtype=torch.double, requires_grad=True),
        }
        x = torch.randn(2, 4, 5, dtype=torch.double, requires_grad=True)

        def run(x, weight, bias, lora_A, lora_B):
            return functional_call(layer, {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}, (x,))

        assert torch.autograd.gradcheck(run, (x, *params.values()))

    def test_gradcheck_of_the_out_of_place_update(self):
        from lightning_lora.lora import low_rank_update

        args = [torch.randn(*shape, dtype=torch.double, requires_grad=True) for shape in ((3, 4, 6), (2, 6), (5, 2))]
        assert torch.autograd.gradcheck(lambda x, a, b: low_rank_update(x, a, b, 0.7), args)

    def test_fast_path_matches_the_plain_formula(self):
        _, layer = make_layer(12, 7, rank=3, alpha=6)
        train_adapter(frozen(layer))
        layer.zero_grad(set_to_none=True)
        x = torch.randn(2, 5, 12, requires_grad=True)
        out = layer(x)
        out.pow(2).sum().backward()
        fast = (out.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        plain = F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x, layer.lora_A) * layer.scale, layer.lora_B)
        plain.pow(2).sum().backward()
        expected = (plain.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
        for got, want in zip(fast, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
