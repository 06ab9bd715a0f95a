"""The LoRA layer family: the invariants for every layer type, then what is special to each."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DORA_KINDS, LAYER_ZOO, Conv1DLike, Single, train_steps, zoo_model
from torch import nn
from torch.nn.utils import parametrize

from lightning_lora import (
    LoRAConfig,
    LoRAConv,
    LoRALayer,
    LoRALinear,
    disable_lora,
    inject_lora,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lightning_lora.core.layers.fast_path import low_rank_update

KINDS = list(LAYER_ZOO)


def adapted(kind: str, device: torch.device | str = "cpu", **config) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    base, x = zoo_model(kind)
    base, x = base.to(device), x.to(device)
    model = inject_lora(
        copy.deepcopy(base), LoRAConfig(**{"rank": 2, "alpha": 4, "target_modules": ["layer"], **config})
    )
    return base, model, x


def outputs(model: nn.Module, x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(x).detach()


class TestEveryLayerType:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("use_dora", [False, True])
    def test_equals_base_at_init_bit_for_bit(self, kind, use_dora, device):
        if use_dora and kind not in DORA_KINDS:
            pytest.skip("DoRA is not defined for this layer type")
        base, model, x = adapted(kind, device, use_dora=use_dora)
        assert torch.equal(outputs(model, x, grad=False), outputs(base, x, grad=False))
        if not kind.startswith("attention"):
            # With autograd on as well. (Attention is exact under no_grad; with grad torch picks its
            # matmul layout by requires_grad, so it agrees to the last bit or so.)
            assert torch.equal(outputs(model, x), outputs(base, x))

    @pytest.mark.parametrize("kind", KINDS)
    def test_only_adapters_get_gradients_and_the_base_stays_put(self, kind, device):
        base, model, x = adapted(kind, device)
        before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
        train_steps(model, x)
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(".lora_" in f".{n}" for n in with_grad)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert not torch.equal(outputs(model, x), outputs(base, x))

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_disabled_is_the_base_bit_for_bit_after_training_and_when_merged(self, kind, mode, device):
        base, model, x = adapted(kind, device)
        train_steps(model, x)
        getattr(model, mode)(), getattr(base, mode)()
        for grad in (False, True):
            with disable_lora(model):
                assert torch.equal(outputs(model, x, grad), outputs(base, x, grad))
        merge_lora(model)
        with disable_lora(model):
            assert torch.equal(outputs(model, x, False), outputs(base, x, False))

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("use_dora", [False, True])
    def test_merged_equals_unmerged_and_unmerge_is_exact(self, kind, use_dora, device):
        if use_dora and kind not in DORA_KINDS:
            pytest.skip("DoRA is not defined for this layer type")
        _, model, x = adapted(kind, device, use_dora=use_dora)
        train_steps(model, x)
        model.eval()
        layer = model.layer
        weight = layer.base_weight()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        unmerged = outputs(model, x, False)
        merge_lora(model)
        assert layer.merged
        torch.testing.assert_close(outputs(model, x, False), unmerged, atol=1e-5, rtol=1e-5)
        merge_lora(model)  # idempotent
        torch.testing.assert_close(outputs(model, x, False), unmerged, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # reports the base
        assert layer.base_weight() is weight  # the merge went into a new tensor
        unmerge_lora(model)
        assert getattr(layer, layer.weight_name) is weight
        assert torch.equal(outputs(model, x, False), unmerged)

    @pytest.mark.parametrize("kind", KINDS)
    def test_merge_and_unload_gives_back_the_original_layer_type(self, kind, device):
        base, model, x = adapted(kind, device)
        train_steps(model, x)
        model.eval()
        expected = outputs(model, x, False)
        plain = merge_and_unload(model)
        assert type(plain.layer) is type(base.layer)
        assert not any(isinstance(m, LoRALayer) for m in plain.modules())
        assert set(plain.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(outputs(plain, x, False), expected, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16-mixed", "16-mixed"])
    def test_adapters_stay_fp32_and_merge_is_fp32_under_autocast(self, kind, half, device):
        _, model, x = adapted(kind, device)
        with torch.autocast(device.type, dtype=half):
            train_steps(model, x)  # as a mixed-precision run trains
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
        assert all(p.grad.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
        model.eval()
        expected = outputs(model, x, False)
        with torch.autocast(device.type, dtype=half):
            merge_lora(model)
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
        assert model.layer.base_weight().dtype == torch.float32
        error = (outputs(model, x, False) - expected).abs().max() / (1 + expected.abs().max())
        assert error <= 1e-5

    @pytest.mark.parametrize("kind", KINDS)
    def test_save_and_load_round_trip_on_the_device(self, kind, device, tmp_path):
        base, model, x = adapted(kind, device)
        train_steps(model, x)
        model.eval()
        save_adapter(model, tmp_path / "adapter")
        loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
        assert all(p.device.type == device.type for p in loaded.parameters())
        assert torch.equal(outputs(loaded, x, False), outputs(model, x, False))


class TestDoRA:
    @pytest.mark.parametrize("kind", ["linear", "conv2d_strided", "conv2d_grouped", "conv1d_transformers"])
    @pytest.mark.parametrize("scale", [1e-25, 1e20])
    def test_extreme_weight_scales_still_start_exactly_at_the_base(self, kind, scale):
        base, x = zoo_model(kind)
        with torch.no_grad():
            base.layer.weight.mul_(scale)
        model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, target_modules=["layer"], use_dora=True))
        magnitude = model.layer.lora_magnitude
        assert torch.isfinite(magnitude).all() and (magnitude > 0).all()
        assert torch.equal(outputs(model, x), outputs(base, x))

    @pytest.mark.parametrize("kind", ["embedding", "attention_batch_first"])
    def test_refused_where_peft_does_not_define_it(self, kind):
        base, _ = zoo_model(kind)
        with pytest.raises(ValueError, match="DoRA is defined for Linear, Conv and Conv1D layers"):
            inject_lora(base, LoRAConfig(target_modules=["layer"], use_dora=True))
        assert not any(isinstance(m, LoRALayer) for m in base.modules())

    def test_the_norm_is_detached(self):
        _, model, x = adapted("linear", use_dora=True)
        train_steps(model, x)
        layer = model.layer
        model.zero_grad(set_to_none=True)
        factor = layer.dora_factor(layer.primary)
        factor.sum().backward()
        assert layer.lora_magnitude.grad is not None
        assert layer.lora_B.grad is None or torch.count_nonzero(layer.lora_B.grad) == 0


class TestConv:
    def test_grouped_update_lives_in_the_grouped_weight(self):
        _, model, x = adapted("conv2d_grouped", rank=3)
        layer = model.layer
        assert layer.lora_A.shape == (2 * 3, 2, 3, 3) and layer.lora_B.shape == (6, 3, 1, 1)
        train_steps(model, x)
        assert layer.delta_weight().shape == layer.weight.shape == (6, 2, 3, 3)
        # The update is exactly the grouped conv with weight delta: merging is exact.
        expected = F.conv2d(x, layer.weight + layer.delta_weight(), layer.bias, padding=1, groups=2)
        torch.testing.assert_close(outputs(model, x), expected, atol=1e-5, rtol=1e-5)

    def test_ungrouped_factors_have_peft_shapes(self):
        _, model, _ = adapted("conv2d_strided", rank=3)
        assert model.layer.lora_A.shape == (3, 4, 3, 3) and model.layer.lora_B.shape == (6, 3, 1, 1)
        assert isinstance(model.layer, LoRAConv)


class TestConv1D:
    def test_recognised_by_structure_and_checked_against_its_own_output(self):
        class Imposter(Conv1DLike):
            def forward(self, x):
                return super().forward(x) * 2

        model = Single(Imposter(5, 4))
        with pytest.raises(ValueError, match="Imposter changes what its base type computes"):
            inject_lora(model, LoRAConfig(target_modules=["layer"]))
        assert isinstance(model.layer, Imposter)


class TestSubclassesWithTheirOwnForward:
    def test_a_forward_that_computes_something_else_is_refused_not_replaced(self):
        class Scaled(nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)

        class Standardised(nn.Conv2d):  # as timm's StdConv2d: the weight is normalised in forward
            def forward(self, x):
                w = (self.weight - self.weight.mean()) / self.weight.std()
                return self._conv_forward(x, w, self.bias)

        for layer in (Scaled(4, 3), Standardised(2, 3, 3)):
            model = Single(layer)
            with pytest.raises(ValueError, match="changes what its base type computes.*Exclude it"):
                inject_lora(model, LoRAConfig(target_modules=["layer"]))
            assert model.layer is layer

    def test_a_forward_that_computes_the_same_is_adapted(self):
        class Logged(nn.Linear):
            def forward(self, x):
                return nn.functional.linear(x, self.weight, self.bias)

        model = inject_lora(Single(Logged(4, 3)), LoRAConfig(target_modules=["layer"]))
        assert isinstance(model.layer, LoRALinear)


class TestEmbedding:
    def test_max_norm_is_refused(self):
        with pytest.raises(ValueError, match="max_norm=1.0 renormalises its rows"):
            inject_lora(Single(nn.Embedding(10, 4, max_norm=1.0)), LoRAConfig(target_modules=["layer"]))

    def test_a_sparse_embedding_trains_its_adapter(self):
        model = inject_lora(Single(nn.Embedding(10, 4, sparse=True)), LoRAConfig(target_modules=["layer"]))
        train_steps(model, torch.randint(0, 10, (3, 5)))
        assert torch.count_nonzero(model.layer.lora_A) > 0


class TestAttention:
    @pytest.mark.parametrize("kind", ["attention_batch_first", "attention_sequence_first"])
    def test_adapts_in_proj_and_out_proj_once_each(self, kind):
        _, model, x = adapted(kind, rank=2, alpha=2)
        train_steps(model, x)
        layer = model.layer
        embed = layer.embed_dim
        in_w = layer.in_proj_weight + layer.lora_B @ layer.lora_A
        out_w = layer.out_proj.weight + layer.out_proj.lora_B @ layer.out_proj.lora_A
        reference = nn.MultiheadAttention(embed, 2, bias=layer.in_proj_bias is not None, batch_first=layer.batch_first)
        with torch.no_grad():
            reference.in_proj_weight.copy_(in_w)
            reference.out_proj.weight.copy_(out_w)
            if layer.in_proj_bias is not None:
                reference.in_proj_bias.copy_(layer.in_proj_bias)
                reference.out_proj.bias.copy_(layer.out_proj.bias)
        torch.testing.assert_close(outputs(model, x), reference(x, x, x)[0].detach(), atol=1e-5, rtol=1e-5)
        merge_lora(model)  # PEFT's open bug adds the out_proj update twice when merged
        torch.testing.assert_close(outputs(model, x, False), reference(x, x, x)[0].detach(), atol=1e-5, rtol=1e-5)

    def test_masks_and_keywords_reach_the_original_forward(self):
        base, model, x = adapted("attention_batch_first")
        mask = torch.tensor([[False] * 4 + [True]] * 2)
        with torch.no_grad():
            got = model.layer(x, x, x, key_padding_mask=mask, need_weights=False)[0]
            want = base.layer(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        assert torch.equal(got, want)

    @pytest.mark.parametrize("trainable", [True, False], ids=["base_trainable", "base_frozen"])
    @pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
    def test_disabled_takes_the_kernel_the_base_takes_so_is_bit_exact(self, trainable, grad):
        """In eval, torch's fused attention kernel runs only when no weight requires grad, and it rounds
        differently (1e-7): a disabled adapter must pick what the base module, as injected, picks."""
        torch.manual_seed(0)
        base = Single(nn.MultiheadAttention(16, 2, batch_first=True)).requires_grad_(trainable).eval()
        model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, target_modules=["layer"])).eval()
        with torch.no_grad():
            model.layer.lora_B.normal_()
        x = torch.randn(3, 5, 16)
        with torch.set_grad_enabled(grad), disable_lora(model):
            got = model.layer(x, x, x, need_weights=False)[0]
        with torch.set_grad_enabled(grad):
            want = base.layer(x, x, x, need_weights=False)[0]
        assert torch.equal(got, want)

    def test_out_proj_alone_is_refused_with_the_fix(self):
        base, _ = zoo_model("attention_batch_first")
        with pytest.raises(ValueError, match="target 'layer' instead"):
            inject_lora(base, LoRAConfig(target_modules=["layer.out_proj"]))

    @pytest.mark.parametrize("targets", ["all-linear", ["0.layers.0.self_attn", "0.layers.1.self_attn"]])
    def test_transformer_encoder_fast_paths_never_skip_a_live_adapter(self, targets):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
        model = nn.Sequential(nn.TransformerEncoder(layer, 2)).eval()  # nested tensors on by default
        x, padding = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
        padding[0, 3:] = True
        inject_lora(model, LoRAConfig(rank=2, target_modules=targets))
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, LoRALayer):
                    layer.lora_B.normal_()
            adapted_out = model[0](x, src_key_padding_mask=padding)
            with disable_lora(model):
                base_out = model[0](x, src_key_padding_mask=padding)
            real = ~padding[..., None].expand_as(adapted_out)
            assert not torch.allclose(adapted_out[real], base_out[real])
            merge_lora(model)
            torch.testing.assert_close(
                model[0](x, src_key_padding_mask=padding)[real], adapted_out[real], atol=1e-4, rtol=1e-4
            )
        assert torch.backends.mha.get_fastpath_enabled()  # nothing global was touched
        plain = merge_and_unload(model)
        assert all(m.activation_relu_or_gelu for m in plain.modules() if isinstance(m, nn.TransformerEncoderLayer))


class TestLinear:
    """The Linear layer against the tutorials' formulations, and its CPU fast path."""

    @pytest.fixture
    def trained(self):
        base, model, _ = adapted("linear", rank=3, alpha=6)
        train_steps(model, torch.randn(16, 12))
        return base.layer, model.layer, torch.randn(11, 12)

    def test_weight_parametrization(self, trained):
        reference, layer, x = trained
        reference = copy.deepcopy(reference)

        class AddLowRank(nn.Module):
            def forward(self, weight):
                return weight + (layer.lora_B @ layer.lora_A) * layer.scale

        parametrize.register_parametrization(reference, "weight", AddLowRank())
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)

    def test_x_a_b_and_merged_weight_formulations(self, trained):
        reference, layer, x = trained
        expected = reference(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scale
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        weight = reference.weight + layer.scale * layer.lora_B @ layer.lora_A
        torch.testing.assert_close(layer(x), F.linear(x, weight, reference.bias), atol=1e-5, rtol=1e-5)

    def test_forward_never_materialises_the_full_update(self, trained, monkeypatch):
        _, layer, x = trained
        calls = []
        monkeypatch.setattr(LoRALinear, "lora_weight", lambda self: calls.append(1))
        layer(x).sum().backward()
        assert calls == []

    def test_scale_init_and_dropout(self):
        layer = LoRALinear(nn.Linear(400, 7), LoRAConfig(rank=4, alpha=8, init="gaussian"))
        assert layer.scale == 2.0 and abs(layer.lora_A.std().item() - 0.25) < 0.02
        assert LoRALinear(nn.Linear(4, 7), LoRAConfig(rank=4, alpha=8, use_rslora=True)).scale == 4.0
        kaiming = LoRALinear(nn.Linear(400, 7), LoRAConfig(rank=4))
        assert kaiming.lora_A.abs().max() <= 1 / math.sqrt(400) + 1e-7
        dropped = LoRALinear(nn.Linear(12, 7).requires_grad_(False), LoRAConfig(rank=2, dropout=0.5))
        assert isinstance(dropped.lora_dropout, nn.Dropout)
        with torch.no_grad():  # B = 0: whatever dropout does to x, the output is the base's
            x = torch.randn(64, 12)
            assert torch.equal(dropped(x), F.linear(x, dropped.weight, dropped.bias))

    def test_gradcheck_through_the_fast_path_with_nd_input(self):
        from torch.func import functional_call

        layer = LoRALinear(nn.Linear(5, 3).double(), LoRAConfig(rank=2, alpha=3)).double()
        names = ("weight", "bias", "lora_adapters.default.lora_A", "lora_adapters.default.lora_B")
        params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]
        params[3] = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
        x = torch.randn(2, 4, 5, dtype=torch.double, requires_grad=True)

        def run(x, *tensors):
            return functional_call(layer, dict(zip(names, tensors, strict=True)), (x,))

        assert torch.autograd.gradcheck(run, (x, *params))
        args = [torch.randn(*s, dtype=torch.double, requires_grad=True) for s in ((3, 4, 6), (2, 6), (5, 2))]
        assert torch.autograd.gradcheck(lambda x, a, b: low_rank_update(x, a, b, 0.7), args)

    def test_fast_path_matches_the_plain_formula(self, trained):
        _, layer, _ = trained
        layer.zero_grad(set_to_none=True)
        x = torch.randn(40, 5, 12, requires_grad=True)
        out = layer(x)
        out.pow(2).sum().backward()
        fast = (out.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        plain = F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x, layer.lora_A) * layer.scale, layer.lora_B)
        plain.pow(2).sum().backward()
        expected = (plain.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
        for got, want in zip(fast, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)

    def test_double_backward_and_torch_func_through_the_fast_path(self, trained):
        from torch.func import functional_call, grad, vmap

        _, layer, _ = trained
        x = torch.randn(40, 12, requires_grad=True)
        (gradient,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
        gradient.pow(2).sum().backward()  # a gradient penalty differentiates the backward itself
        assert layer.lora_A.grad is not None
        params = {k: v.detach() for k, v in layer.named_parameters()}
        per_sample = vmap(grad(lambda p, xi: functional_call(layer, p, (xi[None],)).sum()), in_dims=(None, 0))
        assert per_sample(params, x.detach())["lora_adapters.default.lora_A"].shape == (40, 3, 12)
        double = LoRALinear(nn.Linear(5, 3).double(), LoRAConfig(rank=2)).double()
        with torch.no_grad():
            double.lora_B.normal_()
        assert torch.autograd.gradgradcheck(double, (torch.randn(40, 5, dtype=torch.double, requires_grad=True),))

    def test_bf16_base_keeps_fp32_adapters_and_starts_at_the_base(self):
        base = nn.Linear(12, 7, dtype=torch.bfloat16).requires_grad_(False)
        layer = LoRALinear(copy.deepcopy(base), LoRAConfig(rank=2))
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        x = torch.randn(3, 12, dtype=torch.bfloat16)
        assert layer(x).dtype == torch.bfloat16 and torch.equal(layer(x), base(x))
