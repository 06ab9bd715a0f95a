"""Atomic writes and validated reads."""

from __future__ import annotations

import pytest
import torch

from lightning_lora.core.fingerprint import tensor_sha256
from lightning_lora.core.safe_io import (
    atomic_directory,
    atomic_file,
    read_json,
    read_safetensors,
    write_safetensors,
)


def test_atomic_file_replaces_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_file_interrupted_keeps_previous_output(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


KIND = {"a.txt", "b.txt"}


def test_atomic_directory_interrupted_keeps_previous_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target, KIND, "test") as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(target, KIND, "test") as tmp:
        (tmp / "a.txt").write_text("v2-partial")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with atomic_directory(target, KIND, "test") as tmp:
        (tmp / "b.txt").write_text("v3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"), atomic_directory(tmp_path / "f", KIND, "test"):
        pass


def test_read_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config not found"):
        read_json(tmp_path / "none.json", "config")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object, found list"):
        read_json(tmp_path / "list.json", "config")


def test_safetensors_round_trip_of_views(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    write_safetensors(tmp_path / "t.safetensors", {"t": base.T, "u": base[0]}, {"k": "v"})
    loaded, metadata = read_safetensors(tmp_path / "t.safetensors", "tensors")
    assert metadata == {"k": "v"}
    assert torch.equal(loaded["t"], base.T) and torch.equal(loaded["u"], base[0])


def test_tensor_hash_is_dtype_and_layout_independent_for_equal_values():
    t = torch.randn(4, 5)
    assert tensor_sha256(t) == tensor_sha256(t.T.contiguous().T)
    assert tensor_sha256(t) != tensor_sha256(t + 1)
    b = t.to(torch.bfloat16)
    assert tensor_sha256(b) == tensor_sha256(b.float())


def test_a_folder_that_cannot_hold_files_is_named_as_given():
    target = "/proc/lightning_lora_test.safetensors"  # /proc accepts no new files, even for root
    with pytest.raises(OSError, match=f"cannot write {target}: cannot write there") as caught:
        with atomic_file(target):
            pass
    assert ".tmp" not in str(caught.value)


@pytest.mark.parametrize("twice", ["lora_A", "__metadata__"])
def test_a_safetensors_header_naming_one_tensor_twice_is_refused(tmp_path, twice):
    """JSON keeps the last of two equal keys without a word: one tensor would silently shadow the other."""
    import json
    import re

    from lightning_lora.core.safe_io import read_safetensors, write_safetensors
    from lightning_lora.errors import DataError

    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"lora_A": torch.ones(2), "lora_B": torch.zeros(2)}, {"a": "1"})
    raw = good.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    text = json.dumps(header)
    entry = f'"{twice}": {json.dumps(header[twice])}'
    forged = text[:-1] + ", " + entry + "}"  # the same name again, pointing at the same bytes
    forged = forged.encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(forged).to_bytes(8, "little") + forged + raw[8 + size :])
    assert len(read_safetensors(good, "adapter weights")[0]) == 2
    with pytest.raises(DataError, match=re.escape(f"names '{twice}' twice")):
        read_safetensors(bad, "adapter weights")
