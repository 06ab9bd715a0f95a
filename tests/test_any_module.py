"""The callback and the checkpoint mixin on LightningModules written as a user would, not NetModule."""

from __future__ import annotations

import copy
import logging
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import (
    LoRACheckpointMixin,
    LoRAConfig,
    LoRALayer,
    get_lora_config,
    inject_lora,
    load_adapter,
    lora_state_dict,
    save_adapter,
)
from lightning_lora.demo.mnist_datamodule import MNISTDataModule
from lightning_lora.errors import UsageError
from lightning_lora.integration.callback import LoRAInjectionCallback
from lightning_lora.integration.exact_resume import ExactResume
from lightning_lora.integration.resumable_checkpoint import ResumableCheckpoint


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


class UserModule(LoRACheckpointMixin, pl.LightningModule):
    """Knows nothing of lightning_lora but the mixin; the base comes from ``base_seed``."""

    def __init__(self, base_seed: int = 0, lr: float = 0.05, in_configure_model: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = None if in_configure_model else make_net(base_seed)
        self.optimizer_saw: list[str] = []

    def configure_model(self) -> None:
        if self.net is None:  # Lightning calls this hook for every stage: build once
            self.net = make_net(self.hparams.base_seed)
        super().configure_model()  # the mixin injects the adapters here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        self.optimizer_saw = sorted(n for n, p in self.named_parameters() if p.requires_grad)
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class WithoutMixin(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net(0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


class Nested(UserModule):
    """A network deeper inside the module: ``module_path="model.backbone"``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.backbone = self.net
        self.net = None

    def configure_model(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.backbone(x)


def trainer(tmp_path, callbacks, max_steps: int = 6, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def data(fake_mnist) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(fake_mnist), batch_size=16)


def lora(**kwargs) -> LoRAInjectionCallback:
    return LoRAInjectionCallback(rank=2, alpha=4, **kwargs)


def checkpoints(tmp_path, **kwargs) -> ResumableCheckpoint:
    return ResumableCheckpoint(dirpath=tmp_path / "ck", every_n_steps=2, **kwargs)


@pytest.mark.parametrize("in_configure_model", [False, True])
def test_fit_validate_test_on_a_user_module(tmp_path, fake_mnist, in_configure_model):
    model = UserModule(in_configure_model=in_configure_model)
    run = trainer(tmp_path, [lora()])
    run.fit(model, data(fake_mnist))
    adapters = {f"net.{k}" for k in lora_state_dict(model.net)}
    assert model.optimizer_saw == sorted(adapters)  # adapters existed before configure_optimizers
    layers = [m for m in model.net.modules() if isinstance(m, LoRALayer)]
    run.validate(model, data(fake_mnist), verbose=False)
    run.test(model, data(fake_mnist), verbose=False)
    assert [m for m in model.net.modules() if isinstance(m, LoRALayer)] == layers  # idempotent across stages
    assert "configure_model" not in vars(model)  # the module is as it was: picklable and copyable
    clone = pickle.loads(pickle.dumps(model))
    assert lora_state_dict(clone.net).keys() == lora_state_dict(model.net).keys()
    copied = copy.deepcopy(model)
    run.test(copied, data(fake_mnist), verbose=False)


def test_a_net_built_in_configure_model_is_adapted_after_that_hook(tmp_path, fake_mnist):
    seen = {}

    class Order(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            seen["net at Callback.setup"] = pl_module.net

        def on_fit_start(self, trainer, pl_module):
            seen["adapted at fit start"] = get_lora_config(pl_module.net) is not None

    model = UserModule(in_configure_model=True)
    trainer(tmp_path, [Order(), lora()]).fit(model, data(fake_mnist))
    assert seen == {"net at Callback.setup": None, "adapted at fit start": True}


def test_adapter_only_checkpoints_resume_and_rebuild_on_the_modules_own_base(tmp_path, fake_mnist):
    model = UserModule()
    trainer(tmp_path, [lora(), checkpoints(tmp_path)]).fit(model, data(fake_mnist))
    last = tmp_path / "ck" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert set(saved["state_dict"]) == {f"net.{k}" for k in lora_state_dict(model.net)}
    assert saved["lightning_lora"]["module_path"] == "net"
    full_model_bytes = 4 * sum(p.numel() for p in make_net(0).parameters())
    assert last.stat().st_size < 0.2 * full_model_bytes

    restored = UserModule.load_from_checkpoint(last)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(restored(x), model(x)) and restored.strict_loading

    resumed = UserModule()
    trainer(tmp_path / "more", [lora()], max_steps=8).fit(resumed, data(fake_mnist), ckpt_path=str(last))
    assert resumed.trainer.global_step == 8


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, fake_mnist):
    straight = UserModule()
    trainer(tmp_path / "a", [lora()], max_steps=8).fit(straight, data(fake_mnist))

    interrupted = UserModule()
    trainer(tmp_path / "b", [lora(), checkpoints(tmp_path / "b")], max_steps=4).fit(interrupted, data(fake_mnist))
    resumed = UserModule()
    last = str(tmp_path / "b" / "ck" / "last.ckpt")
    trainer(tmp_path / "c", [lora()], max_steps=8).fit(resumed, data(fake_mnist), ckpt_path=last)
    for key, value in lora_state_dict(straight.net).items():
        assert torch.equal(lora_state_dict(resumed.net)[key], value), key


def as_if_under(model, strategy) -> None:
    """Attach a stand-in Trainer holding only ``strategy`` (what the mixin asks a Trainer for)."""
    from types import SimpleNamespace

    model.trainer = SimpleNamespace(strategy=strategy, callbacks=[])


def test_under_a_strategy_that_loads_the_state_itself_checkpoints_stay_full(tmp_path, fake_mnist):
    """FSDP and DeepSpeed load a checkpoint's state (strictly) before the module's hooks: those get the full
    state, so the strategy's own strict load compares the keys the state holds; the others adapter-only."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    model = UserModule()
    inject_lora(model.net, LoRAConfig(rank=2, alpha=4))
    written = {}
    for name, strategy in (("fsdp", FSDPStrategy()), ("ddp", DDPStrategy())):
        as_if_under(model, strategy)
        checkpoint = {"state_dict": model.state_dict()}
        model.on_save_checkpoint(checkpoint)
        written[name] = checkpoint
    assert set(written["fsdp"]["state_dict"]) == set(model.state_dict())
    assert written["fsdp"]["lightning_lora"]["adapter_only"] is False
    assert set(written["ddp"]["state_dict"]) == {f"net.{k}" for k in lora_state_dict(model.net)}
    assert model.strict_loading  # the mixin never loosens Lightning's strict load

    fresh = UserModule()
    inject_lora(fresh.net, LoRAConfig(rank=2, alpha=4))
    extra = dict(written["fsdp"]["state_dict"], **{"net.9.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(extra, strict=fresh.strict_loading)  # what the strategy's strict load does


def test_a_checkpoint_whose_state_the_strategy_loaded_already_is_checked_all_the_same(tmp_path, fake_mnist):
    """The strategy pops the state and loads it before on_load_checkpoint: the loaded values are checked."""
    from lightning.pytorch.strategies import FSDPStrategy

    source = UserModule()
    inject_lora(source.net, LoRAConfig(rank=2, alpha=4))
    as_if_under(source, FSDPStrategy())
    saved = {"state_dict": source.state_dict()}
    source.on_save_checkpoint(saved)

    def restored_as_fsdp_does(checkpoint):
        model = UserModule()
        inject_lora(model.net, LoRAConfig(rank=2, alpha=4))
        model.load_state_dict(checkpoint.pop("state_dict"), strict=True)
        model.on_load_checkpoint(checkpoint)
        return model

    model = restored_as_fsdp_does(copy.deepcopy(saved))
    for key, value in saved["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    broken = copy.deepcopy(saved)
    next(v for k, v in broken["state_dict"].items() if "lora_B" in k).fill_(float("nan"))
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        restored_as_fsdp_does(broken)
    adapter_only = copy.deepcopy(saved)
    adapter_only["lightning_lora"]["adapter_only"] = True
    with pytest.raises(UsageError, match="resume it with the strategy that wrote it"):
        restored_as_fsdp_does(adapter_only)


def test_a_different_base_is_refused_naming_the_first_differing_tensor(tmp_path, fake_mnist):
    trainer(tmp_path, [lora(), checkpoints(tmp_path)]).fit(UserModule(), data(fake_mnist))
    last = tmp_path / "ck" / "last.ckpt"
    with pytest.raises(
        UsageError, match=r"not the one the checkpoint's adapters were trained on: 'net.1.bias' differs"
    ):
        UserModule.load_from_checkpoint(last, base_seed=1)
    with pytest.raises(UsageError, match="'net.1.bias' differs"):
        trainer(tmp_path / "more", [lora()], max_steps=8).fit(UserModule(base_seed=1), data(fake_mnist), ckpt_path=last)


def test_an_adapter_of_another_shape_in_the_checkpoint_is_named(tmp_path, fake_mnist):
    from lightning_lora.errors import DataError

    trainer(tmp_path, [lora(), checkpoints(tmp_path)]).fit(UserModule(), data(fake_mnist))
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    key = "net.1.lora_adapters.default.lora_A"
    saved["state_dict"][key] = torch.zeros(3, 784)  # rank 3 where the adapter has rank 2
    torch.save(saved, tmp_path / "altered.ckpt")
    with pytest.raises(DataError, match=rf"{key} \(3, 784\) in the checkpoint, \(2, 784\) in the model"):
        UserModule.load_from_checkpoint(tmp_path / "altered.ckpt")


def test_resuming_with_other_lora_settings_is_refused(tmp_path, fake_mnist):
    trainer(tmp_path, [lora(), checkpoints(tmp_path)]).fit(UserModule(), data(fake_mnist))
    with pytest.raises(UsageError, match="use the LoRA settings of the run that wrote it"):
        trainer(tmp_path / "more", [LoRAInjectionCallback(rank=3)], max_steps=8).fit(
            UserModule(), data(fake_mnist), ckpt_path=str(tmp_path / "ck" / "last.ckpt")
        )


def test_without_the_mixin_checkpoints_stay_full_and_the_callback_says_how(tmp_path, fake_mnist, caplog, monkeypatch):
    monkeypatch.setattr("lightning_lora.integration.callback._TOLD", set())
    model = WithoutMixin()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [lora(), checkpoints(tmp_path)], limit_val_batches=0).fit(model, data(fake_mnist))
        trainer(tmp_path / "again", [lora()], limit_val_batches=0).fit(WithoutMixin(), data(fake_mnist))
    assert caplog.text.count("inherit lightning_lora.LoRACheckpointMixin") == 1  # said once
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert "net.1.weight" in saved["state_dict"] and "lightning_lora" not in saved
    resumed = WithoutMixin()  # the callback injects before the restore: resume works without the mixin
    trainer(tmp_path / "r", [lora()], max_steps=8, limit_val_batches=0).fit(
        resumed, data(fake_mnist), ckpt_path=str(tmp_path / "ck" / "last.ckpt")
    )
    assert resumed.global_step == 8


def test_one_callback_per_trainer_and_a_bare_layer_is_named(tmp_path, fake_mnist):
    with pytest.raises(UsageError, match="more than one LoRAInjectionCallback"):
        trainer(tmp_path, [lora(), lora(module_path="net")]).fit(UserModule(), data(fake_mnist))

    class BareLayer(UserModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(784, 10)

    with pytest.raises(UsageError, match=r"single Linear.*module_path=''.*target_modules=\['net'\]"):
        trainer(tmp_path, [lora()]).fit(BareLayer(), data(fake_mnist))


def test_module_path_reaches_a_nested_network_and_a_wrong_one_is_named(tmp_path, fake_mnist):
    model = Nested()
    trainer(tmp_path, [lora(module_path="model.backbone")]).fit(model, data(fake_mnist))
    assert get_lora_config(model.model.backbone) is not None
    with pytest.raises(UsageError, match=r"module_path 'model.head': model has no attribute 'head'.*\['backbone'\]"):
        trainer(tmp_path, [lora(module_path="model.head")]).fit(Nested(), data(fake_mnist))


def test_two_process_ddp_with_adapter_only_checkpoints(tmp_path, fake_mnist):
    from helpers import RecordAdapters

    record = RecordAdapters(str(tmp_path / "ranks"))
    run = trainer(tmp_path, [lora(), record, checkpoints(tmp_path)], strategy="ddp_spawn", devices=2, max_steps=4)
    run.fit(UserModule(), data(fake_mnist))
    rank0 = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ranks" / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == {f"net.{k}" for k in rank0}
    restored = UserModule.load_from_checkpoint(tmp_path / "ck" / "last.ckpt")
    assert all(torch.equal(lora_state_dict(restored.net)[k], v) for k, v in rank0.items())


def test_the_fabric_recipe_in_the_readme(tmp_path):
    from lightning.fabric import Fabric

    from lightning_lora import LoRAConfig, inject_lora

    fabric = Fabric(accelerator="cpu", devices=1)
    model = inject_lora(make_net(0), LoRAConfig(rank=4, alpha=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    for _ in range(3):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    save_adapter(model, tmp_path / "adapter")  # the plain model's keys, whatever Fabric wraps it in
    fresh = load_adapter(make_net(0), tmp_path / "adapter")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))


class ShuffledData(pl.LightningDataModule):
    """A user's plain DataLoader(shuffle=True): its order comes from torch's global RNG."""

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        images, labels = torch.randn(40, 1, 28, 28, generator=generator), torch.arange(40) % 10
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8, shuffle=True)


def test_a_plain_shuffled_loader_resumed_at_an_epoch_end_repeats_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything(7) sets: both runs share the seed
    straight = UserModule()
    trainer(tmp_path / "a", [ExactResume(), lora(dropout=0.2)], max_steps=15, limit_val_batches=0).fit(
        straight, ShuffledData()
    )
    interrupted = UserModule()
    callbacks = [ExactResume(), lora(dropout=0.2), checkpoints(tmp_path / "b")]
    run = trainer(tmp_path / "b", callbacks, max_steps=10, limit_val_batches=0)
    run.fit(interrupted, ShuffledData())  # 5 batches an epoch: step 10 ends epoch 1
    resumed = UserModule()
    last = str(tmp_path / "b" / "ck" / "last.ckpt")
    trainer(tmp_path / "c", [ExactResume(), lora(dropout=0.2)], max_steps=15, limit_val_batches=0).fit(
        resumed, ShuffledData(), ckpt_path=last
    )
    for key, value in lora_state_dict(straight.net).items():
        assert torch.equal(lora_state_dict(resumed.net)[key], value), key


class RecordNoise(pl.Callback):
    """Records a random draw a user's training_step might make (augmentation, noise)."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.draws.append(float(torch.rand(())))


def test_unseeded_runs_differ_and_a_resumed_one_keeps_its_seed(tmp_path, fake_mnist, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    draws = []
    for i in range(2):
        noise = RecordNoise()
        trainer(tmp_path / str(i), [ExactResume(), lora(), noise], max_steps=3).fit(UserModule(), data(fake_mnist))
        draws.append(noise.draws)
    assert draws[0] != draws[1], "two runs without seed_everything drew the same random numbers"
    straight, noise = UserModule(), RecordNoise()
    every_two = ResumableCheckpoint(dirpath=tmp_path / "s/ck", every_n_steps=2, keep=5)
    callbacks = [ExactResume(), lora(dropout=0.3), every_two, noise]
    trainer(tmp_path / "s", callbacks, max_steps=4).fit(straight, data(fake_mnist))
    resumed, later = UserModule(), RecordNoise()
    trainer(tmp_path / "r", [ExactResume(), lora(dropout=0.3), later], max_steps=4).fit(
        resumed, data(fake_mnist), ckpt_path=str(next((tmp_path / "s/ck").glob("*step=2.ckpt")))
    )
    assert later.draws == noise.draws[2:]
    for key, value in lora_state_dict(straight.net).items():
        assert torch.equal(lora_state_dict(resumed.net)[key], value), key


def test_each_step_seeds_only_the_generators_it_draws_from(tmp_path, fake_mnist, monkeypatch):
    """torch.manual_seed would also queue a seeding of every backend not initialised, with a stack trace each
    step; ExactResume seeds the CPU's generator (and the module's GPU's) directly, with the same effect."""

    def refuse(seed):
        raise AssertionError("torch.manual_seed called in a training step")

    noise = RecordNoise()
    trainer(tmp_path / "a", [ExactResume(), lora(dropout=0.3), noise], max_steps=3).fit(UserModule(), data(fake_mnist))
    model, again = UserModule(), RecordNoise()
    monkeypatch.setattr(torch, "manual_seed", refuse)
    trainer(tmp_path / "b", [ExactResume(), lora(dropout=0.3), again], max_steps=3).fit(model, data(fake_mnist))
    assert again.draws == noise.draws
