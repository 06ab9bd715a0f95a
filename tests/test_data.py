"""MNISTDataModule on synthetic IDX files, read through torchvision's real MNIST code."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms
from torchvision.datasets import MNIST

from lightning_lora.demo.batch_data import TensorBatchDataset, keep_batch
from lightning_lora.demo.mnist_datamodule import MNISTDataModule
from lightning_lora.demo.mnist_files import MNIST_FILES


def fitted(fake_mnist, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(fake_mnist), batch_size=16, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_normalisation_matches_torchvision_exactly(fake_mnist):
    dm = fitted(fake_mnist)
    reference = MNIST(
        str(fake_mnist),
        train=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]),
    )
    for i in (0, 7, 99):
        image, label = reference[i]
        assert torch.equal(dm.test_set.inputs[i], image) and dm.test_set.targets[i] == label


def test_full_split_sizes_and_seeded_disjoint_validation(fake_mnist):
    dm = fitted(fake_mnist, val_fraction=0.25)
    assert len(dm.train_set) == 300 and len(dm.val_set) == 100 and len(dm.test_set) == 100
    again = fitted(fake_mnist, val_fraction=0.25)
    assert torch.equal(again.val_set.inputs, dm.val_set.inputs)
    other_seed = fitted(fake_mnist, val_fraction=0.25, seed=1)
    assert not torch.equal(other_seed.val_set.targets, dm.val_set.targets)
    train_rows = {tuple(x.flatten()[:50].tolist()) for x in dm.train_set.inputs}
    assert not any(tuple(x.flatten()[:50].tolist()) in train_rows for x in dm.val_set.inputs)


def test_split_first_then_filter_training_into_target_and_retain_validation(fake_mnist):
    everything = fitted(fake_mnist)
    dm = fitted(fake_mnist, train_digits=[9, 4])
    assert torch.equal(dm.val_set.targets, everything.val_set.targets)  # the same validation images for every run
    trained = torch.cat([y for _, y in dm.train_dataloader()])
    assert set(trained.tolist()) == {4, 9} and len(trained) == int(
        torch.isin(dm.train_set.targets, torch.tensor([4, 9])).sum()
    )
    target, retain = dm.val_dataloader()
    assert dm.val_set_names == ["target", "retain"]
    assert set(torch.cat([y for _, y in target]).tolist()) == {4, 9}
    assert set(torch.cat([y for _, y in retain]).tolist()) == set(range(10)) - {4, 9}
    assert sum(len(y) for _, y in target) + sum(len(y) for _, y in retain) == len(dm.val_set)
    assert set(dm.test_set.targets.tolist()) == set(range(10))
    assert everything.val_set_names is None and not isinstance(everything.val_dataloader(), list)


def test_a_bare_digit_means_that_digit(fake_mnist):
    assert MNISTDataModule(train_digits=7).train_digits == [7]


def test_evaluation_has_its_own_batch_size(fake_mnist):
    dm = fitted(fake_mnist, eval_batch_size=64)
    assert [len(y) for _, y in dm.test_dataloader()] == [64, 36]
    assert len(next(iter(dm.train_dataloader()))[1]) == 16


class Guesser(torch.nn.Module):
    """Predicts 3 for every image: digit 0..9 except 3 are all wrong; make 5 the worst by a bias."""

    def __init__(self, worst: int) -> None:
        super().__init__()
        self.worst = worst
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(len(x), 10)
        logits[:, self.worst] = 1.0
        return logits


def test_weakest_is_the_digit_the_model_gets_wrong_most(fake_mnist, caplog):
    dm = MNISTDataModule(data_dir=str(fake_mnist), train_digits="weakest", batch_size=16)
    with pytest.raises(ValueError, match="'weakest' needs the model"):
        dm.setup("fit")
    counts = torch.bincount(dm.val_set.targets, minlength=10)
    # A model that always answers 3 gets every other digit wrong: the weakest is the most frequent non-3.
    expected = max((d for d in range(10) if d != 3), key=lambda d: (counts[d], -d))
    assert dm.pick_weakest(Guesser(worst=3)) == expected and dm.train_digits == [expected]
    assert dm.state_dict() == {"train_digits": [expected]}
    assert dm.resume_settings()["train_digits"] == [expected]  # what ExactResume compares on resume


def test_replay_mixes_a_fixed_share_of_other_digits_into_every_batch(fake_mnist):
    dm = fitted(fake_mnist, train_digits=[9], replay_fraction=0.25)
    assert dm.replay_per_batch == 4
    batches = [y for _, y in dm.train_dataloader()]
    nines = int((dm.train_set.targets == 9).sum())
    assert len(batches) == nines // 12 and all(len(y) == 16 for y in batches)
    for y in batches:
        assert (y == 9).sum() == 12 and (y != 9).sum() == 4
    others = torch.cat([y[y != 9] for y in batches])
    assert len(set(others.tolist())) > 3  # drawn from all the other digits
    again = [y for _, y in fitted(fake_mnist, train_digits=[9], replay_fraction=0.25).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # seeded


def test_replay_keeps_the_mix_on_every_ddp_rank(fake_mnist, monkeypatch):
    """Lightning's DistributedSamplerWrapper deals position i to rank i % world: each rank's batch keeps the mix."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    dm = fitted(fake_mnist, train_digits=[9], replay_fraction=0.25)
    sampler = dm.train_dataloader().sampler
    monkeypatch.setattr(type(sampler), "_world_size", staticmethod(lambda: 2))
    labels = dm.train_set.targets
    for rank in (0, 1):
        shard = list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False))
        assert len(shard) % 16 == 0 and shard
        for start in range(0, len(shard), 16):
            batch = labels[shard[start : start + 16]]
            assert (batch == 9).sum() == 12, rank


def test_rotation_turns_every_split(fake_mnist):
    upright, turned = fitted(fake_mnist), fitted(fake_mnist, rotation=90.0)
    expected = torch.rot90(upright.test_set.inputs, 1, dims=(2, 3))
    background = upright.test_set.inputs.min()
    # Rotating by 90 degrees moves pixels exactly; bilinear interpolation of exact positions changes nothing.
    assert torch.allclose(turned.test_set.inputs, expected, atol=1e-5), (turned.test_set.inputs - expected).abs().max()
    assert not torch.equal(turned.train_set.inputs, upright.train_set.inputs) and background < 0


def test_loaders_serve_whole_batches_through_getitems(fake_mnist):
    dm = fitted(fake_mnist)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    assert dm.train_dataloader().collate_fn is keep_batch
    assert sum(len(y) for _, y in dm.test_dataloader()) == 100
    single = TensorBatchDataset(torch.zeros(3, 2), torch.arange(3))
    assert single[1][1] == 1 and torch.equal(single.__getitems__([2, 0])[1], torch.tensor([2, 0]))


def _resident_fit(fake_mnist, tmp_path, accelerator: str, device_resident: bool, **data):
    """A short LoRA fine-tune on digits [3, 9] with replay; the data module, the adapters, the batches' devices."""
    import lightning.pytorch as pl
    from torch import nn

    from lightning_lora import LitClassifier, LoRAInjectionCallback, lora_state_dict

    pl.seed_everything(0, verbose=False)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    dm = MNISTDataModule(
        data_dir=str(fake_mnist), train_digits=[3, 9], replay_fraction=0.25, batch_size=8, val_per_digit=4,
        device_resident=device_resident, **data,
    )  # fmt: skip
    adapter_dir = str(tmp_path / f"adapter_{device_resident}")
    seen: set[str] = set()  # where the loader served each batch, before Lightning moved it to the model
    dm.on_before_batch_transfer = lambda batch, index: seen.add(str(batch[0].device.type)) or batch
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=6, val_check_interval=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[LoRAInjectionCallback(rank=2, alpha=4, adapter_dir=adapter_dir)],
    )  # fmt: skip
    model = LitClassifier(net)
    trainer.fit(model, dm)
    return dm, {k: v.cpu() for k, v in lora_state_dict(model.net).items()}, seen


def test_device_resident_is_a_no_op_on_the_cpu(fake_mnist, tmp_path):
    dm, resident, seen = _resident_fit(fake_mnist, tmp_path, "cpu", device_resident=True)
    assert dm.train_set.inputs.device.type == "cpu" and seen == {"cpu"}
    _, plain, _ = _resident_fit(fake_mnist, tmp_path, "cpu", device_resident=False)
    assert all(torch.equal(resident[k], plain[k]) for k in plain)


@pytest.mark.gpu
def test_device_resident_keeps_every_split_on_the_gpu_and_trains_the_same(fake_mnist, tmp_path):
    dm, resident, seen = _resident_fit(fake_mnist, tmp_path, "gpu", device_resident=True)
    assert seen == {"cuda"}
    parts = [dm.train_set, dm.val_set, *dm._val_parts().values()]
    assert all(p.inputs.is_cuda and p.targets.is_cuda for p in parts)
    dm.setup("test")
    assert dm.test_set.inputs.is_cuda
    _, plain, seen_plain = _resident_fit(fake_mnist, tmp_path, "gpu", device_resident=False)
    assert seen_plain == {"cpu"}  # served from the host, copied by Lightning
    for key, value in plain.items():
        torch.testing.assert_close(resident[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_digits": [10]}, r"train_digits must be digits 0-9, got \[10\]"),
        ({"train_digits": [-1, 3]}, r"got \[-1\]"),
        ({"train_digits": []}, "train_digits is empty"),
        ({"train_digits": [9, 9]}, r"train_digits lists \[9\] more than once"),
        ({"train_digits": "worst"}, "train_digits must be a digit 0-9, a list of them, 'weakest' or None, got 'worst'"),
        ({"train_digits": 12}, r"train_digits must be digits 0-9, got \[12\]"),
        ({"replay_fraction": 0.25}, "replay_fraction needs train_digits"),
        ({"replay_fraction": 1.0, "train_digits": 9}, r"replay_fraction must be a number in \[0, 1\)"),
        ({"replay_fraction": 0.01, "train_digits": 9, "batch_size": 10}, "must round to at least 1"),
        ({"eval_batch_size": 0}, "eval_batch_size must be an integer >= 1, got 0"),
        ({"rotation": float("nan")}, "rotation must be a number of degrees"),
        ({"val_fraction": 0.0}, r"val_fraction must be a number in \(0, 1\), got 0.0"),
        ({"val_fraction": 1}, r"val_fraction must be a number in \(0, 1\), got 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"device_resident": "yes"}, "device_resident must be true or false, got 'yes'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MNISTDataModule(**kwargs)


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass the folder that holds MNIST/raw/"):
        MNISTDataModule(data_dir=str(tmp_path / "f"))


def test_missing_data_without_download(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "none"), download=False)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "none" / "MNIST" / "raw") in message and "download=False" in message
    assert all(name in message for name in MNIST_FILES) and "--data.data_dir" in message


def test_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "mirrors", ["file:///nonexistent-mirror/"])  # offline, deterministically
    dm = MNISTDataModule(data_dir=str(tmp_path / "fresh"), download=True)
    with pytest.raises(FileNotFoundError, match="could not be downloaded .*Error downloading"):
        dm.setup("fit")
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "existing").mkdir()
    with pytest.raises(FileNotFoundError):
        MNISTDataModule(data_dir=str(tmp_path / "existing")).prepare_data()
    assert list((tmp_path / "existing").iterdir()) == []
