"""Real architectures (random weights, tiny sizes): torchvision ResNet and ViT, transformers GPT-2 and BERT.

Each: inject, a few optimizer steps, only adapters change, merge == unmerged, disable == base bit
for bit, our save/load round trip, and PEFT's round trip both ways.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from helpers import require
from torch import nn

from lightning_lora import (
    LoRAConfig,
    LoRALayer,
    base_state_dict,
    disable_lora,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

peft = require("peft")


def resnet():
    torchvision = require("torchvision")
    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)


def vit():
    torchvision = require("torchvision")
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model, torch.randn(2, 3, 16, 16)


class Logits(nn.Module):
    """A transformers model returning its logits tensor (what the invariants compare)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def gpt2():
    transformers = require("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    return Logits(transformers.GPT2LMHeadModel(config)), torch.randint(0, 50, (2, 6))


def bert():
    transformers = require("transformers")
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    return Logits(transformers.BertForSequenceClassification(config)), torch.randint(0, 50, (2, 6))


MODELS = {
    # Batch norm stays in eval mode: its running statistics are part of the frozen base.
    "resnet18": (resnet, LoRAConfig(rank=2, target_modules=["*conv*", "fc"])),
    "vit": (vit, LoRAConfig(rank=2, use_dora=False)),
    "gpt2": (gpt2, LoRAConfig(rank=2, use_dora=True)),
    "bert": (bert, LoRAConfig(rank=2, modules_to_save=["classifier"], bias="all")),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    make, config = MODELS[name]
    with warnings.catch_warnings(action="ignore"):
        model, x = make()
    return model.eval().requires_grad_(False), x, config


def steps(model: nn.Module, x: torch.Tensor, n: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(n):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", MODELS)
def test_invariants_on_a_real_architecture(name, tmp_path):
    base, x, config = build(name)
    model = inject_lora(copy.deepcopy(base), config)
    assert any(isinstance(m, LoRALayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    steps(model, x)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_state_dict(model).items())
    with torch.no_grad():
        adapted = model(x)
        assert not torch.equal(adapted, base(x))
        with disable_lora(model):
            assert torch.equal(model(x), base(x))
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)
        with disable_lora(model):
            assert torch.equal(model(x), base(x))
        unmerge_lora(model)
        assert torch.equal(model(x), adapted)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(x), adapted)
        plain = merge_and_unload(copy.deepcopy(model))
        assert not any(isinstance(m, LoRALayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), adapted, atol=1e-4, rtol=1e-4)


def zero_attention_out_proj_updates(model: nn.Module) -> None:
    """PEFT adds a MultiheadAttention's out_proj update twice (its open bug); compare without one."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALayer) and isinstance(getattr(module, "out_proj", None), LoRALayer):
                module.out_proj.lora_B.zero_()


@pytest.mark.parametrize("name", MODELS)
def test_peft_round_trip_both_ways(name, tmp_path):
    base, x, config = build(name)
    model = inject_lora(copy.deepcopy(base), config)
    steps(model, x)
    zero_attention_out_proj_updates(model)
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings(action="ignore"), torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
        theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert lora_state_dict(back).keys() == lora_state_dict(model).keys()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_gpt2_all_linear_adapts_conv1d_and_leaves_the_tied_head_out(caplog):
    base, ids, _ = build("gpt2")
    with caplog.at_level(logging.INFO, logger="lightning_lora"):
        model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2))
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert {"model.transformer.h.0.attn.c_attn", "model.transformer.h.1.mlp.c_fc"} <= adapted
    assert "model.lm_head" not in adapted
    assert "model.lm_head (output layer tied to model.transformer.wte.weight" in caplog.text


def test_gpt2_tied_head_named_explicitly_merges_without_touching_the_embedding():
    base, ids, _ = build("gpt2")
    model = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, target_modules=["lm_head"]))
    steps(model, ids)
    embedding = model.model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
        with disable_lora(model):
            assert torch.equal(model(ids), base(ids))
    assert torch.equal(model.model.transformer.wte.weight, embedding)
