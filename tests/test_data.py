"""MNISTDataModule on synthetic IDX files, read through torchvision's real MNIST code."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms
from torchvision.datasets import MNIST

from lightning_lora.data import MNIST_FILES, MNISTDataModule, TensorBatchDataset, keep_batch


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


def test_train_digits_filter_train_and_val_but_not_test(fake_mnist):
    dm = fitted(fake_mnist, train_digits=[9, 4])
    assert set(dm.train_set.targets.tolist()) == {4, 9} and set(dm.val_set.targets.tolist()) == {4, 9}
    assert len(dm.train_set) + len(dm.val_set) == 80
    assert set(dm.test_set.targets.tolist()) == set(range(10))


def test_loaders_serve_whole_batches_through_getitems(fake_mnist):
    dm = fitted(fake_mnist)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    assert dm.train_dataloader().collate_fn is keep_batch
    assert sum(len(y) for _, y in dm.test_dataloader()) == 100
    single = TensorBatchDataset(torch.zeros(3, 2), torch.arange(3))
    assert single[1][1] == 1 and torch.equal(single.__getitems__([2, 0])[1], torch.tensor([2, 0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_digits": [10]}, r"train_digits must be digits 0-9, got \[10\]"),
        ({"train_digits": [-1, 3]}, r"got \[-1\]"),
        ({"train_digits": []}, "train_digits is empty"),
        ({"train_digits": [9, 9]}, r"train_digits lists \[9\] more than once"),
        ({"train_digits": 9}, "train_digits must be a list of digits 0-9 or None, got 9"),
        ({"val_fraction": 0.0}, r"val_fraction must be a number in \(0, 1\), got 0.0"),
        ({"val_fraction": 1}, r"val_fraction must be a number in \(0, 1\), got 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
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
