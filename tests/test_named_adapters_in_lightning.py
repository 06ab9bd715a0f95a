"""Named adapters in a Lightning run: the callback trains a new adapter beside loaded, frozen ones, and
adapter-only checkpoints hold them all and resume exactly."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from helpers import write_base_checkpoint

from lightning_lora import lora_adapter_names, lora_layers
from lightning_lora.demo.classifiers import LitClassifier
from lightning_lora.demo.mnist_datamodule import MNISTDataModule
from lightning_lora.demo.nets import MLP
from lightning_lora.errors import UsageError
from lightning_lora.integration.callback import LoRAInjectionCallback
from lightning_lora.integration.exact_resume import ExactResume
from lightning_lora.integration.resumable_checkpoint import ResumableCheckpoint


@pytest.fixture
def base_ckpt(tmp_path):
    torch.manual_seed(1)
    return str(write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[16])))


def module(base_ckpt) -> LitClassifier:
    return LitClassifier(
        MLP(hidden_sizes=[16]), optimizer=functools.partial(torch.optim.Adam, lr=0.01), base_checkpoint=base_ckpt
    )


def fit(root, callbacks, model, datamodule, max_steps=6, ckpt=None):
    trainer = pl.Trainer(
        default_root_dir=str(root), accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, datamodule, ckpt_path=ckpt)
    return trainer


def digit(fake_mnist, d: int) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(fake_mnist), batch_size=8, train_digits=[d], seed=0)


def adapter_values(model, name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".lora_adapters.{name}." in n}


@pytest.fixture
def digit9_folder(tmp_path, fake_mnist, base_ckpt):
    callback = LoRAInjectionCallback(rank=2, alpha=4, adapter_name="digit9", adapter_dir=str(tmp_path / "a9"))
    fit(tmp_path / "run9", [callback], module(base_ckpt), digit(fake_mnist, 9))
    return tmp_path / "a9"


def test_a_new_adapter_trains_beside_a_loaded_one_that_stays_frozen(tmp_path, fake_mnist, base_ckpt, digit9_folder):
    model = module(base_ckpt)
    callback = LoRAInjectionCallback(
        rank=3, adapter_name="digit4", load_adapters={"digit9": str(digit9_folder)}, adapter_dir=str(tmp_path / "a4")
    )
    before = None

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = adapter_values(pl_module, "digit9")

    trainer = fit(tmp_path / "run4", [callback, Snapshot()], model, digit(fake_mnist, 4))
    assert lora_adapter_names(model.net) == ["digit9", "digit4"]
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if ".digit4." in n}
    assert all(torch.equal(v, adapter_values(model, "digit9")[k]) for k, v in before.items())
    assert all(layer.active_adapters == ["digit4"] for _, layer in lora_layers(model.net))
    assert sorted(p.name for p in (tmp_path / "a4").iterdir()) == ["digit4", "digit9"]  # PEFT's layout


def test_adapter_only_checkpoints_hold_every_adapter_and_resume_exactly(tmp_path, fake_mnist, base_ckpt, digit9_folder):
    def run(root, ckpt=None, max_steps=6):
        pl.seed_everything(0)  # the new adapter's A is drawn at injection: the same draw in every run
        model = module(base_ckpt)
        callback = LoRAInjectionCallback(rank=3, adapter_name="digit4", load_adapters={"digit9": str(digit9_folder)})
        checkpoints = ResumableCheckpoint(every_n_steps=3, dirpath=str(root / "ck"))
        fit(root, [callback, ExactResume(), checkpoints], model, digit(fake_mnist, 4), max_steps, ckpt)
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "stopped", max_steps=3)
    saved = torch.load(next((tmp_path / "stopped" / "ck").glob("*step=3*.ckpt")), weights_only=True)
    assert {k.split(".lora_adapters.")[1].split(".")[0] for k in saved["state_dict"]} == {"digit9", "digit4"}
    resumed = run(tmp_path / "resumed", ckpt=str(next((tmp_path / "stopped" / "ck").glob("*step=3*.ckpt"))))
    for name in ("digit9", "digit4"):
        expected, got = adapter_values(straight, name), adapter_values(resumed, name)
        assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_resuming_with_another_adapter_name_is_refused_naming_both(tmp_path, fake_mnist, base_ckpt):
    checkpoints = ResumableCheckpoint(every_n_steps=3, dirpath=str(tmp_path / "ck"))
    callback = LoRAInjectionCallback(rank=2, adapter_name="digit9")
    fit(tmp_path, [callback, ExactResume(), checkpoints], module(base_ckpt), digit(fake_mnist, 9), 3)
    ckpt = str(next((tmp_path / "ck").glob("*.ckpt")))
    other = LoRAInjectionCallback(rank=2, adapter_name="digit4")
    with pytest.raises(
        UsageError, match="adapter is named 'digit9', this model's are \\['digit4'\\].*--lora.adapter_name digit9"
    ):
        fit(tmp_path, [other, ExactResume()], module(base_ckpt), digit(fake_mnist, 9), 6, ckpt)


def test_resuming_a_two_adapter_run_with_other_adapters_is_refused_naming_the_run_s_options(
    tmp_path, fake_mnist, base_ckpt, digit9_folder
):
    checkpoints = ResumableCheckpoint(every_n_steps=3, dirpath=str(tmp_path / "ck"))
    callback = LoRAInjectionCallback(rank=3, adapter_name="digit4", load_adapters={"digit9": str(digit9_folder)})
    fit(tmp_path / "r", [callback, ExactResume(), checkpoints], module(base_ckpt), digit(fake_mnist, 4), 3)
    ckpt = str(next((tmp_path / "ck").glob("*.ckpt")))
    fix = r"\['digit4'\] trained, \['digit9'\] loaded.*--lora.adapter_name digit4 and --lora.load_adapters naming"
    for other in (
        LoRAInjectionCallback(rank=3, adapter_name="digit4"),  # the loaded adapter not given again
        LoRAInjectionCallback(rank=3, adapter_name="digit5", load_adapters={"digit9": str(digit9_folder)}),
        LoRAInjectionCallback(rank=3, load_adapters={"digit9": str(digit9_folder)}),  # adapter_name left out
    ):
        with pytest.raises(UsageError, match=r"the checkpoint holds adapters \['digit9', 'digit4'\] \(" + fix):
            fit(tmp_path / "r", [other, ExactResume()], module(base_ckpt), digit(fake_mnist, 4), 6, ckpt)
    wider = LoRAInjectionCallback(rank=3, alpha=4, adapter_name="digit9", adapter_dir=str(tmp_path / "w9"))
    fit(tmp_path / "w", [wider], module(base_ckpt), digit(fake_mnist, 9))
    other = LoRAInjectionCallback(rank=3, adapter_name="digit4", load_adapters={"digit9": str(tmp_path / "w9")})
    with pytest.raises(UsageError, match=r"adapter 'digit9' was trained with other LoRA settings \(rank 2 in the "
                       r"checkpoint, 3 now.*same folders in --lora.load_adapters"):  # fmt: skip
        fit(tmp_path / "r", [other, ExactResume()], module(base_ckpt), digit(fake_mnist, 4), 6, ckpt)
    other = LoRAInjectionCallback(rank=4, adapter_name="digit4", load_adapters={"digit9": str(digit9_folder)})
    with pytest.raises(UsageError, match=r"adapter 'digit4' was trained with other LoRA settings \(rank 3 in the "
                       r"checkpoint, 4 now.*e.g. --lora.rank"):  # fmt: skip
        fit(tmp_path / "r", [other, ExactResume()], module(base_ckpt), digit(fake_mnist, 4), 6, ckpt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapter_name": "a.b"}, "cannot name an adapter"),
        ({"adapter_name": "x", "load_adapters": {"x": "f"}}, "the adapter this callback trains"),
        ({"load_adapters": ["f"]}, "must map adapter names to adapter folders"),
    ],
)
def test_bad_names_are_refused_when_the_callback_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAInjectionCallback(rank=2, **kwargs)


def test_a_missing_adapter_folder_is_a_usage_error_naming_it(tmp_path, fake_mnist, base_ckpt):
    callback = LoRAInjectionCallback(rank=2, adapter_name="b", load_adapters={"a": str(tmp_path / "nowhere")})
    with pytest.raises(UsageError, match="nowhere does not exist"):
        fit(tmp_path, [callback], module(base_ckpt), digit(fake_mnist, 9), 2)
