"""PiSSA and OLoRA: factors from the base weight, the layer left its residual, PEFT's definitions (to 1e-6).

What holds: outputs at injection equal the base's (to rounding); disable_lora gives the original base
bit for bit (the original weight is kept aside); only the first adapter may use them; files load both
ways with PEFT; convert_to_lora writes the plain LoRA adapter PEFT's path_initial_model_for_weight_conversion
writes, which on the original base gives the trained model; remove_lora gives the original tensor back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Conv1DLike, TwoLinear, assert_same_per_adapter, require
from torch import nn

from lightning_lora import (
    LoRAConfig,
    adapter_per_sample,
    delete_adapter,
    disable_lora,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    remove_lora,
    save_adapter,
)
from lightning_lora.core.adapter_tensors import base_state_dict

INITS = ["pissa", "olora"]


def trained(model: nn.Module, steps: int = 5) -> nn.Module:
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_at_injection_equal_the_base_and_disabled_is_the_original_bit_for_bit(init, rslora):
    base, x = TwoLinear().requires_grad_(False), torch.randn(6, 12)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, init=init, use_rslora=rslora))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)
        assert not torch.equal(model.fc1.weight, base.fc1.weight)  # it runs the residual
    trained(model)
    with torch.no_grad():
        with disable_lora(model):
            assert torch.equal(model(x), base(x))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_state_dict(model).items())


@pytest.mark.parametrize("init", INITS)
def test_factors_and_residual_equal_peft_s(init):
    peft = require("peft")
    base, x = TwoLinear().requires_grad_(False), torch.randn(6, 12)
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(rank=3, alpha=6, init=init))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"], init_lora_weights=init)
    )
    for name, layer in lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A, peft_layer.lora_A["default"].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.lora_B, peft_layer.lora_B["default"].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_transformers_conv1d_takes_its_transposed_weight():
    base = nn.Sequential(Conv1DLike(7, 12)).requires_grad_(False)
    x = torch.randn(3, 12)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, init="pissa", target_modules=["0"]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_a_saved_adapter_loads_on_the_original_base_here_and_in_peft(init, tmp_path):
    peft = require("peft")
    base, x = TwoLinear().requires_grad_(False), torch.randn(6, 12)
    model = trained(inject_lora(copy.deepcopy(base), LoRAConfig(rank=3, alpha=6, init=init))).eval()
    save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path / "a")(x), expected, atol=1e-6, rtol=1e-6)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rslora", [False, True])
def test_converted_to_plain_lora_it_gives_the_trained_model_on_the_original_base_as_peft_s_does(init, rslora, tmp_path):
    peft = require("peft")
    base, x = TwoLinear().requires_grad_(False), torch.randn(6, 12)
    model = trained(inject_lora(copy.deepcopy(base), LoRAConfig(rank=3, alpha=6, init=init, use_rslora=rslora)))
    save_adapter(model, tmp_path / "plain", convert_to_lora=True)
    plain = load_adapter(copy.deepcopy(base), tmp_path / "plain")
    assert all(layer.rank == 6 and layer.lora_original_weight is None for _, layer in lora_layers(plain))
    assert all(torch.equal(layer.weight, getattr(base, n).weight) for n, layer in lora_layers(plain))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x), atol=1e-5, rtol=1e-5)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain").eval()
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)


def test_merge_and_unload_and_remove_lora_leave_plain_layers():
    base, x = TwoLinear().requires_grad_(False), torch.randn(6, 12)
    model = trained(inject_lora(copy.deepcopy(base), LoRAConfig(rank=3, init="pissa")))
    with torch.no_grad():
        expected = model(x)
        merged = merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    original = model.fc1.base_layer.weight
    remove_lora(model)
    assert model.fc1.weight is original and torch.equal(model(x), base(x))


def test_only_a_first_adapter_may_rewrite_the_base_and_it_is_refused_where_it_cannot_hold():
    model = inject_lora(TwoLinear(), LoRAConfig(rank=2, init="pissa"))
    with pytest.raises(ValueError, match="only a model's first adapter may use it"):
        inject_lora(model, LoRAConfig(rank=2, init="olora"), adapter_name="b")
    inject_lora(model, LoRAConfig(rank=2), adapter_name="b")
    with pytest.raises(ValueError, match="delete the others first"):
        delete_adapter(model, "default")
    with pytest.raises(ValueError, match="would run the residual"):
        with adapter_per_sample(model, ["b"] * 4):
            pass
    with pytest.raises(ValueError, match="use_dora is not supported"):
        LoRAConfig(init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="defined for linear layers, not for Conv2d"):
        inject_lora(nn.Sequential(nn.Conv2d(3, 4, 3)), LoRAConfig(rank=2, init="olora", target_modules=["0"]))
    with pytest.raises(ValueError, match=r"takes 9 directions from a \(5, 16\) weight.*at most 5"):
        inject_lora(TwoLinear(), LoRAConfig(rank=9, init="pissa"))


@pytest.mark.parametrize("init", INITS)
def test_adapter_only_checkpoints_rebuild_the_residual_on_the_module_s_own_base(init):
    from lightning_lora.demo.classifiers import LitClassifier
    from lightning_lora.demo.nets import MLP

    def module() -> LitClassifier:
        torch.manual_seed(0)
        return LitClassifier(MLP(hidden_sizes=[8]))

    model = module()
    inject_lora(model.net, LoRAConfig(rank=3, init=init))
    with torch.no_grad():
        model.net.layers[0].lora_B.add_(0.1)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert all(".lora_adapters." in k for k in checkpoint["state_dict"])  # the residual is not written
    fresh = module()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = torch.randn(4, 784)
    assert torch.equal(fresh(x), model(x))
    with disable_lora(fresh.net), disable_lora(model.net):
        assert torch.equal(fresh(x), model(x))


def test_a_plain_adapter_beside_pissa_is_fingerprinted_on_the_residual_it_ran_on(tmp_path):
    from lightning_lora import save_adapter, set_active_adapters

    base, x = TwoLinear().requires_grad_(False), torch.randn(4, 12)
    model = trained(inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, init="pissa")))
    inject_lora(model, LoRAConfig(rank=2), adapter_name="b")
    set_active_adapters(model, "b")
    trained(model)
    save_adapter(model, tmp_path / "both")
    with pytest.raises(ValueError, match="made for another base model"):  # b alone on the original is wrong
        load_adapter(copy.deepcopy(base), tmp_path / "both", adapter_name="b")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "both")  # the PiSSA adapter leaves the residual ...
    load_adapter(fresh, tmp_path / "both", adapter_name="b")  # ... that b was made on
    set_active_adapters(fresh, "b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"adapters \['b'\] ran on the residual 'default' \(pissa\).*without convert"):
        save_adapter(model, tmp_path / "converted", convert_to_lora=True)
    assert not (tmp_path / "converted").exists()


def test_a_weighted_adapter_made_from_pissa_is_a_plain_adapter_on_its_residual_and_loads_back(tmp_path):
    from lightning_lora import add_weighted_adapter, save_adapter

    base, x = TwoLinear().requires_grad_(False), torch.randn(4, 12)
    model = trained(inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, init="pissa")))
    add_weighted_adapter(model, ["default"], [0.5], "halved", combination="cat")
    save_adapter(model, tmp_path / "both")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "both")
    load_adapter(fresh, tmp_path / "both", adapter_name="halved")
    assert_same_per_adapter(fresh, model, x, ["default", "halved"], atol=1e-6)
    with pytest.raises(ValueError, match="inject or load it into the plain base.*convert_to_lora=True"):
        load_adapter(
            fresh, tmp_path / "both", adapter_name="again", subfolder=""
        )  # a PiSSA folder as a further adapter
