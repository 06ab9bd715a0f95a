"""Bad MNIST files: every way an IDX file can be wrong is one error naming the file and the fault."""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_idx

from lightning_lora.cli import main
from lightning_lora.demo.mnist_datamodule import MNISTDataModule
from lightning_lora.errors import DataError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml")
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


@pytest.fixture
def broken(tmp_path, fake_mnist):
    """A copy of the synthetic MNIST whose files a test then damages."""
    copy = tmp_path / "mnist"
    shutil.copytree(fake_mnist, copy)
    return copy, copy / "MNIST" / "raw"


DAMAGE = {
    "truncated": (IMAGES, lambda p: p.write_bytes(p.read_bytes()[:-100]), "the file is truncated"),
    "trailing bytes": (IMAGES, lambda p: p.write_bytes(p.read_bytes() + b"x"), "followed by extra bytes"),
    "empty": (LABELS, lambda p: p.write_bytes(b""), "too short for an IDX header"),
    "gzip": (IMAGES, lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + p.read_bytes()), "not an MNIST images file"),
    "swapped": (LABELS, lambda p: p.write_bytes((p.parent / IMAGES).read_bytes()), "not an MNIST labels file"),
    "32x32": (IMAGES, lambda p: write_idx(p, torch.zeros(400, 32, 32, dtype=torch.uint8)), "32x32 images"),
    "header only": (
        IMAGES,
        lambda p: p.write_bytes(struct.pack(">HBBI", 0, 8, 3, 400)),
        "shorter than its own header",
    ),
    "counts differ": (LABELS, lambda p: write_idx(p, torch.zeros(399, dtype=torch.uint8)), "400 images but"),
    "labels outside 0-9": (LABELS, lambda p: write_idx(p, torch.full((400,), 10, dtype=torch.uint8)), "outside 0-9"),
    "no images": (IMAGES, lambda p: write_idx(p, torch.zeros(0, 28, 28, dtype=torch.uint8)), "holds no images"),
}


@pytest.mark.parametrize("fault", DAMAGE)
def test_one_clear_error_naming_the_file(broken, fault):
    root, raw = broken
    name, damage, message = DAMAGE[fault]
    damage(raw / name)
    data = MNISTDataModule(data_dir=str(root))
    with pytest.raises(DataError, match=message) as error:
        data.setup("fit")
    assert str(raw / (IMAGES if fault == "counts differ" else name)) in str(error.value)


def test_the_command_line_reports_it_in_one_paragraph(broken, tmp_path, monkeypatch, capsys):
    root, raw = broken
    DAMAGE["labels outside 0-9"][1](raw / LABELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", CONFIG, "--data.data_dir", str(root), "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds labels outside 0-9 ([10], first at index 0)" in err
