"""LoRA+ parameter groups: PEFT's groups for the same adapters, and the classifier and CLI that take them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import require
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, lora_plus_param_groups
from lightning_lora.core.peft_format import peft_keys


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(tokens))))


def rates(groups: list[dict]) -> dict[int, float]:
    return {id(p): group["lr"] for group in groups for p in group["params"]}


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ["emb", "fc1", "fc2"], "bias": "lora_only"},
        {"target_modules": ["fc1", "fc2"], "use_dora": True},
    ],
    ids=["lora_embedding_biases", "dora"],
)
def test_every_tensor_gets_the_rate_peft_s_loraplus_optimizer_gives_it(settings):
    peft = require("peft")
    from peft.optimizers import create_loraplus_optimizer
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    base = Tagger()
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(rank=2, alpha=4, **settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, **settings))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    their_rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    their_params = {p.data_ptr(): p for p in theirs.parameters() if p.requires_grad}
    by_file_key = {
        key: their_rate[id(their_params[t.data_ptr()])] for key, t in get_peft_model_state_dict(theirs).items()
    }
    our_rate = rates(lora_plus_param_groups(ours, lr=1e-3, ratio=16))
    keys = peft_keys(ours)
    named = dict(ours.named_parameters())
    compared = {name: (our_rate[id(named[name])], by_file_key[keys[name]]) for name in keys}
    assert compared and all(a == b for a, b in compared.values()), compared
    assert set(our_rate) == {id(p) for p in ours.parameters() if p.requires_grad}
    assert {1e-3, 1.6e-2} <= {a for a, _ in compared.values()}


def test_b_learns_at_ratio_times_a_and_nothing_frozen_is_grouped():
    model = inject_lora(Tagger(), LoRAConfig(rank=2, target_modules=["fc1", "fc2"], modules_to_save=["emb"]))
    groups = lora_plus_param_groups(model, lr=2e-4, ratio=8)
    by_name = {group["name"]: group for group in groups}
    assert set(by_name) == {"lora_plus_A", "lora_plus_B"}
    assert by_name["lora_plus_B"]["lr"] == pytest.approx(1.6e-3) and by_name["lora_plus_A"]["lr"] == 2e-4
    assert {id(p) for p in by_name["lora_plus_B"]["params"]} == {id(model.fc1.lora_B), id(model.fc2.lora_B)}
    a_group = {id(p) for p in by_name["lora_plus_A"]["params"]}
    assert id(model.fc1.lora_A) in a_group and id(model.emb.trained_module.weight) in a_group  # a 2-D copy: A's rate
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(groups)  # what the groups are for
    model(torch.randint(0, 20, (3, 5))).sum().backward()
    optimizer.step()
    assert torch.count_nonzero(model.fc1.lora_B) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a positive finite number, got 0.0"),
        ({"lr": float("nan")}, "lr must be a positive finite number, got nan"),
        ({"lr": 1e-3, "ratio": 0.5}, "ratio must be >= 1"),
        ({"lr": 1e-3, "ratio": True}, "ratio must be a positive finite number, got True"),
        ({"lr": 1e-3, "embedding_lr": -1}, "embedding_lr must be a positive finite number"),
    ],
)
def test_bad_rates_are_refused_naming_them(kwargs, message):
    model = inject_lora(Tagger(), LoRAConfig(rank=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match=message):
        lora_plus_param_groups(model, **kwargs)


def test_a_model_without_adapters_or_trainable_parameters_is_refused():
    with pytest.raises(ValueError, match="holds no LoRA adapters, so LoRA\\+ has no B.*inject adapters first"):
        lora_plus_param_groups(Tagger(), lr=1e-3)  # trainable, but its biases are no adapter's B
    model = inject_lora(Tagger(), LoRAConfig(rank=2, target_modules=["fc1"])).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter; inject adapters first"):
        lora_plus_param_groups(model, lr=1e-3)


def test_the_command_line_trains_with_lora_plus_and_resumes_only_with_the_same_ratio(workdir, fake_mnist, capsys):
    """--model.lora_plus_ratio: B's group at ratio x the optimizer's rate; lr_on_resume keeps the ratio; a resume
    that drops or changes it (whose rates the checkpoint would silently restore) is refused, writing nothing."""
    from lightning_lora.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    fit = ["fit", "-c", str(configs / "finetune_lora.yaml"), "--data.data_dir", str(fake_mnist),
           "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "1.0"]  # fmt: skip
    main([*fit, "--trainer.max_steps", "3", "--model.lora_plus_ratio", "16"])
    runs = workdir / "runs/finetune_lora"

    def rates(version: str) -> dict[str, float]:
        state = torch.load(runs / version / "checkpoints/last.ckpt", weights_only=True)["optimizer_states"][0]
        return {group["name"]: group["lr"] for group in state["param_groups"]}

    assert rates("version_0") == {"lora_plus_A": 1e-3, "lora_plus_B": pytest.approx(1.6e-2)}
    resume = [*fit, "--trainer.max_steps", "5", "--ckpt_path", "runs/finetune_lora"]
    for extra, message in (
        ([], "trained with LoRA+ (B at 16 times A's rate); resume with --model.lora_plus_ratio 16"),
        (["--model.lora_plus_ratio", "8"], "model.lora_plus_ratio: 16 in the checkpoint, 8 now"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*resume, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert sorted(p.name for p in runs.iterdir()) == ["version_0"], "a refused resume left a run folder"
    main([*resume, "--model.lora_plus_ratio", "8", "--model.lr_on_resume", "1e-4"])
    assert rates("version_1") == {"lora_plus_A": 1e-4, "lora_plus_B": pytest.approx(8e-4)}
    main([*fit, "--trainer.max_steps", "2", "--trainer.logger.init_args.name", "plain"])
    with pytest.raises(SystemExit):
        main([*fit, "--trainer.max_steps", "4", "--ckpt_path", "runs/plain", "--model.lora_plus_ratio", "16"])
    assert "trained without LoRA+; resume without --model.lora_plus_ratio" in capsys.readouterr().err
    pretrain = ["fit", "-c", str(configs / "pretrain.yaml"), "--data.data_dir", str(fake_mnist),
                "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*pretrain, "--model.lora_plus_ratio", "16"])  # no adapters: nothing for LoRA+ to do
    assert exit_info.value.code == 2
    assert "network holds no LoRA adapters" in capsys.readouterr().err
