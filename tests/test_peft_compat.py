"""PEFT compatibility: its files both ways, and its numerics per layer type (forward and gradients)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import Single, require
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, load_adapter, lora_state_dict, save_adapter
from lightning_lora.core.peft_format import peft_keys

peft = require("peft")
Conv1D = require("transformers.pytorch_utils").Conv1D

KINDS = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(9, 12)),
    "linear_3d_no_bias": (lambda: nn.Linear(12, 7, bias=False), lambda: torch.randn(2, 4, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 10)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), lambda: torch.randn(2, 2, 5, 5, 5)),
    "embedding": (lambda: nn.Embedding(30, 6, padding_idx=0), lambda: torch.randint(0, 30, (3, 5))),
    "conv1d_transformers": (lambda: Conv1D(7, 12), lambda: torch.randn(2, 4, 12)),
}
NO_DORA = {"embedding"}


def quiet_peft():
    return warnings.catch_warnings(action="ignore")  # PEFT warns about fan_in_fan_out and merges


def randomise(params) -> None:
    """Adapters as they look after training: B away from zero, every tensor moved."""
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)


def peft_file_key(live_name: str) -> str:
    """PEFT's parameter name -> the key its files use."""
    key = live_name.replace(".modules_to_save.default", "").replace(".default", "")
    return key.removesuffix(".weight") if "lora_magnitude_vector" in key else key


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def compare(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Same outputs, and the same gradient for every adapter tensor (matched through the file keys)."""
    ours.zero_grad(), theirs.zero_grad()
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=atol, rtol=1e-5)
    out_ours.pow(2).sum().backward()
    out_theirs.pow(2).sum().backward()
    keys = peft_keys(ours)
    theirs_by_key = {peft_file_key(n): p for n, p in trainable(theirs).items()}
    ours_by_key = {keys[n]: p for n, p in trainable(ours).items()}
    assert ours_by_key.keys() == theirs_by_key.keys()
    for key, param in ours_by_key.items():
        torch.testing.assert_close(param.grad, theirs_by_key[key].grad, atol=1e-4, rtol=1e-4, msg=key)


def configs(kind: str):
    yield LoRAConfig(rank=2, alpha=4, target_modules=["layer"])
    if kind not in NO_DORA:
        yield LoRAConfig(rank=3, alpha=5, target_modules=["layer"], use_dora=True)
        yield LoRAConfig(rank=4, alpha=2, target_modules=["layer"], use_rslora=True, bias="lora_only")


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_our_folder_and_computes_what_we_compute(kind, tmp_path):
    make_layer, make_input = KINDS[kind]
    for i, config in enumerate(configs(kind)):
        torch.manual_seed(i)
        base, x = Single(make_layer()).requires_grad_(False), make_input()
        ours = inject_lora(copy.deepcopy(base), config)
        randomise(trainable(ours).values())
        save_adapter(ours, tmp_path / str(i))
        with quiet_peft():
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / str(i), is_trainable=True)
        compare(ours, theirs, x)


@pytest.mark.parametrize("kind", KINDS)
def test_we_load_peft_folders_and_compute_what_peft_computes(kind, tmp_path, caplog):
    make_layer, make_input = KINDS[kind]
    options = [{}, {"use_dora": True}, {"use_rslora": True, "bias": "lora_only"}][: 1 if kind in NO_DORA else 3]
    for i, extra in enumerate(options):
        torch.manual_seed(i)
        base, x = Single(make_layer()).requires_grad_(False), make_input()
        with quiet_peft():
            theirs = peft.get_peft_model(
                copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["layer"], **extra)
            )
        randomise(trainable(theirs).values())
        with quiet_peft():
            theirs.save_pretrained(tmp_path / str(i))
        ours = load_adapter(copy.deepcopy(base), tmp_path / str(i))
        compare(ours, theirs, x)
    assert "has no base fingerprint" in caplog.text  # PEFT writes none: loaded with a one-line notice


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = Conv1D(8, 8)
        self.mlp = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.mlp(self.proj(self.embed(ids)))))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_every_feature_round_trips_both_ways(bias, tmp_path):
    torch.manual_seed(0)
    base, ids = Net().requires_grad_(False), torch.randint(0, 20, (3, 4))
    config = LoRAConfig(
        rank=2,
        alpha=4,
        target_modules=["embed", "proj", "mlp"],
        modules_to_save=["head"],
        bias=bias,
        use_rslora=True,
        rank_pattern={"mlp": 5},
        alpha_pattern={"proj": 7},
    )
    ours = inject_lora(copy.deepcopy(base), config)
    randomise(trainable(ours).values())
    save_adapter(ours, tmp_path / "ours")
    with quiet_peft():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    compare(ours, theirs, ids)
    with quiet_peft():
        theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert lora_state_dict(back).keys() == lora_state_dict(ours).keys()
    assert all(torch.equal(lora_state_dict(back)[k], v) for k, v in lora_state_dict(ours).items())


def test_attention_matches_peft_except_peft_adds_the_out_proj_update_twice(tmp_path, caplog):
    """PEFT's open bug: its MultiheadAttention adds ``out_proj``'s update twice, merged or not.

    With that update zero the two agree; with it non-zero PEFT equals a model whose out_proj
    update is doubled, and we equal the model with the update once (test_layers checks that).
    """
    torch.manual_seed(0)
    base, x = Single(nn.MultiheadAttention(8, 2, batch_first=True)).requires_grad_(False), torch.randn(2, 5, 8)
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, alpha=4, target_modules=["layer"]))
    randomise([ours.layer.lora_A, ours.layer.lora_B, ours.layer.out_proj.lora_A])
    save_adapter(ours, tmp_path / "a")
    with quiet_peft():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ours.layer.out_proj.lora_B.normal_()
    with caplog.at_level("WARNING", logger="lightning_lora"):
        save_adapter(ours, tmp_path / "b")
    assert "MultiheadAttention layer" in caplog.text and "adds out_proj's update twice" in caplog.text
    with quiet_peft():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b", is_trainable=True)
        doubled = copy.deepcopy(ours)
        with torch.no_grad():
            doubled.layer.out_proj.lora_B.mul_(2)
        torch.testing.assert_close(theirs(x), doubled(x), atol=1e-5, rtol=1e-5)
    back = load_adapter(copy.deepcopy(base), tmp_path / "b")
    assert torch.equal(back(x), ours(x))
