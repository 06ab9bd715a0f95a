"""Your folders and files: nothing of the user's is deleted or overwritten, outputs never half-written.

Writers refuse a target that is not their own kind of output and say what is in the way; an
interrupted write leaves the previous output and its temporary files are swept by the next write;
a full disk names the file; two runs never share a checkpoint folder.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_lora.cli import main
from lightning_lora.core.safe_io import OutputInTheWay, atomic_directory, atomic_file, sweep_stale_temporaries
from lightning_lora.demo.run_loading import load_run

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "finetune_lora.yaml")


@pytest.fixture
def project(tmp_path):
    """A user's folder with their own files in it."""
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "train.py").write_text("print('mine')")
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_into_a_folder_of_the_users_refuses_and_touches_nothing(lora_run, project, capsys):
    _, checkpoint = lora_run
    before = contents(project)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(checkpoint), "--out", str(project)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "is not an adapter folder: it holds notes.txt, train.py. Nothing was written or removed" in err
    assert contents(project) == before


@pytest.mark.parametrize(
    "entries",
    [{".git/HEAD": "ref", ".env": "SECRET=1"}, {"README.md": "# mine"}, {"adapter_config.json/notes": "a folder"}],
)
def test_hidden_files_a_readme_or_a_folder_under_an_output_name_are_someone_elses(lora_run, tmp_path, capsys, entries):
    _, checkpoint = lora_run
    folder = tmp_path / "p"
    for name, text in entries.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = contents(folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(checkpoint), "--out", str(folder)])
    assert exit_info.value.code == 1 and "is not an adapter folder" in capsys.readouterr().err
    assert contents(folder) == before
    net = load_run(checkpoint).net
    from lightning_lora import save_adapter

    with pytest.raises(OutputInTheWay):
        save_adapter(net, folder)  # the callback's adapter_dir uses the same writer
    assert contents(folder) == before


def test_export_into_another_runs_folder_refuses_but_its_own_is_fine(lora_run, tmp_path, capsys):
    root, checkpoint = lora_run
    other = tmp_path / "runs" / "other" / "version_0"
    (other / "checkpoints").mkdir(parents=True)
    (other / "adapter").mkdir()
    (other / "adapter" / "adapter_config.json").write_text("{}")  # that run's own adapter
    before = contents(other)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(checkpoint), "--out", str(other / "adapter")])
    assert exit_info.value.code == 2 and "is inside another run's folder" in capsys.readouterr().err
    assert contents(other) == before
    own = checkpoint.parent.parent / "exported"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(checkpoint), "--out", str(own)])
    assert exit_info.value.code == 0 and (own / "adapter_config.json").is_file()


def test_merge_onto_a_file_it_did_not_write_refuses(lora_run, project, capsys):
    _, checkpoint = lora_run
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--ckpt", str(checkpoint), "--out", str(project / "notes.txt")])
    assert exit_info.value.code == 1 and "was not written by this command" in capsys.readouterr().err
    assert (project / "notes.txt").read_text() == "mine"


def test_report_into_a_folder_of_the_users_refuses(lora_run, project, fake_mnist, capsys):
    _, checkpoint = lora_run
    with pytest.raises(SystemExit):
        main(["report", "--finetuned", str(checkpoint), "--out", str(project), "--data-dir", str(fake_mnist)])
    assert "is not a report folder: it holds notes.txt, train.py" in capsys.readouterr().err
    assert sorted(contents(project)) == ["notes.txt", "train.py"]


def test_outputs_are_replaced_only_by_their_own_kind(lora_run, tmp_path):
    _, checkpoint = lora_run
    for _ in range(2):  # the second export replaces the first: an adapter folder is its own kind
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "adapter")])
        assert exit_info.value.code == 0
        with pytest.raises(SystemExit) as exit_info:
            main(["merge", "--ckpt", str(checkpoint), "--out", str(tmp_path / "m.safetensors")])
        assert exit_info.value.code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "m.safetensors"]  # no temporaries


def test_an_interrupted_write_keeps_the_previous_output_and_the_next_write_sweeps(lora_run, tmp_path, monkeypatch):
    _, checkpoint = lora_run
    adapter, merged = tmp_path / "adapter", tmp_path / "m.safetensors"
    for verb, out in (("export", adapter), ("merge", merged)):
        with pytest.raises(SystemExit):
            main([verb, "--ckpt", str(checkpoint), "--out", str(out)])
    before = contents(tmp_path)

    def interrupted(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning_lora.core.adapter_layout.write_safetensors", interrupted)
    monkeypatch.setattr("lightning_lora.demo.merged_model.write_safetensors", interrupted)
    for verb, out in (("export", adapter), ("merge", merged)):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--ckpt", str(checkpoint), "--out", str(out)])
        assert exit_info.value.code == 130
    assert contents(tmp_path) == before


def test_a_killed_writer_leaves_temporaries_the_next_write_sweeps(tmp_path):
    target = tmp_path / "out.bin"
    code = (
        "import os, sys\n"
        "from lightning_lora.core.safe_io import atomic_file\n"
        f"with atomic_file({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.bin.") and not target.exists()
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and target.read_bytes() == b"whole"


@pytest.mark.parametrize("swap", ["one rename (renameat2)", "file by file (no renameat2)"])
def test_a_folder_swap_never_removes_the_output_path(tmp_path, monkeypatch, swap):
    import lightning_lora.core.safe_io as files

    kind, out = {"a.txt", "b.txt"}, tmp_path / "out"
    with atomic_directory(out, kind, "test") as tmp:
        (tmp / "a.txt").write_text("1")
    if swap.startswith("file"):
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    else:
        (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
        assert files._exchange(tmp_path / "x", tmp_path / "y"), "this filesystem swaps folders in one rename"
        (tmp_path / "x").rmdir(), (tmp_path / "y").rmdir()
    present = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def watched(a, b, real=real):
            present.append(out.is_dir())
            real(a, b)
            present.append(out.is_dir())

        monkeypatch.setattr(os, name, watched)
    with atomic_directory(out, kind, "test") as tmp:
        (tmp / "b.txt").write_text("2")
    assert all(present)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_temporaries_of_live_processes_are_left_alone(tmp_path):
    live = tmp_path / f".out.bin.{os.getpid()}.abc.tmp"
    dead = tmp_path / ".out.bin.999999999.abc.tmp"
    live.write_text("x"), dead.write_text("x")
    assert sweep_stale_temporaries(tmp_path, "out.bin") == [dead]
    assert live.exists() and not dead.exists()


def test_the_next_run_sweeps_what_a_killed_checkpoint_writer_left_in_any_version(tmp_path, monkeypatch, fake_mnist):
    import sys

    import torch
    from helpers import write_base_checkpoint

    from lightning_lora.demo.nets import RichBoyNet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    write_base_checkpoint(tmp_path / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
    old = tmp_path / "runs/finetune_lora/version_0/checkpoints"
    old.mkdir(parents=True)
    dead = [old / ".last.ckpt.999999999.abc.tmp", old / ".step=2.ckpt.999999998.x_y.tmp"]
    alive = old / f".last.ckpt.{os.getpid()}.abc.tmp"
    mine = old / "notes.tmp"  # not of the writers' form: never touched
    for path in (*dead, alive, mine):
        path.write_bytes(b"partial")
    config = str(Path(__file__).resolve().parents[1] / "configs/finetune_lora.yaml")
    main_args = ["fit", "-c", config, "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "1.0"]  # fmt: skip
    main(main_args)
    assert not any(p.exists() for p in dead) and alive.exists() and mine.exists()
    assert torch.load(tmp_path / "runs/finetune_lora/version_1/checkpoints/last.ckpt", weights_only=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 400 KB tmpfs: real ENOSPC (needs root and mount; skipped elsewhere)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mountpoint)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=False)


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(lora_run, full_disk, capsys):
    _, checkpoint = lora_run
    out = full_disk / "merged.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--ckpt", str(checkpoint), "--out", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}: the device holding it is full (ENOSPC)" in err and "Traceback" not in err
    assert list(full_disk.iterdir()) == []


@pytest.mark.parametrize(
    "code, said",
    [(errno.ENOSPC, "full (ENOSPC)"), (errno.EDQUOT, "quota is used up (EDQUOT)"), (errno.EFBIG, "(EFBIG"),
     (errno.EROFS, "read-only (EROFS)")],
    ids=["ENOSPC", "EDQUOT", "EFBIG", "EROFS"],
)  # fmt: skip
def test_a_simulated_write_failure_during_a_checkpoint_names_the_file_and_its_cause(
    lora_run, tmp_path, monkeypatch, fake_mnist, capsys, code, said
):
    root, _ = lora_run
    monkeypatch.chdir(root)

    def no_space(obj, path, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", CONFIG, "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: cannot write runs/finetune_lora/" in err and ".ckpt" in err and said in err
    assert "Traceback" not in err and "most likely full" not in err


@pytest.mark.parametrize("verb", ["merge", "export"])
def test_a_file_size_limit_is_named_as_such_not_as_a_full_disk(lora_run, tmp_path, verb):
    """Under `ulimit -f`, export and merge said a bare "[Errno 27] File too large", fit "disk most likely full"."""
    _, checkpoint = lora_run
    out = tmp_path / ("merged.safetensors" if verb == "merge" else "adapter")
    script = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)); "
        "from lightning_lora.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run([sys.executable, "-c", script, verb, "--ckpt", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True, cwd=checkpoint.parents[4], timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot write {out}" in done.stderr and "(EFBIG" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_runs_never_share_a_checkpoint_folder(lora_run, fake_mnist, monkeypatch):
    root, first = lora_run
    monkeypatch.chdir(root)
    before, versions = first.read_bytes(), set((root / "runs/finetune_lora").iterdir())
    main(["fit", "-c", CONFIG, "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "1",
          "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    (new,) = set((root / "runs/finetune_lora").iterdir()) - versions
    assert (new / "checkpoints/last.ckpt").is_file() and first.read_bytes() == before


@pytest.mark.parametrize(
    "kept, extra, message, then, made",
    [
        ("checkpoints/last.ckpt", [], "already holds another run's checkpoints",
         ["--trainer.max_steps", "2", "--ckpt_path", "checkpoints/last.ckpt"], None),  # resuming it is fine
        ("adapter/adapter_model.safetensors",
         ["--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"], "holds another run's adapter",
         ["--lora.adapter_dir", "second"], "second/adapter_model.safetensors"),  # a folder of its own: fine
    ],
    ids=["checkpoints", "adapter"],
)  # fmt: skip
def test_without_a_logger_a_second_run_may_not_overwrite_the_first(
    tmp_path, fake_mnist, monkeypatch, capsys, kept, extra, message, then, made
):
    import sys

    from helpers import write_base_checkpoint

    from lightning_lora.demo.nets import RichBoyNet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    write_base_checkpoint(tmp_path / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
    args = ["fit", "-c", CONFIG, "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "1",
            "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", *extra]  # fmt: skip
    main(args)
    first = (tmp_path / kept).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / kept).read_bytes() == first
    main([*args, *then])
    assert made is None or (tmp_path / made).is_file()


def test_a_callback_adapter_dir_of_someone_elses_is_refused_before_training(tmp_path, fake_mnist):
    import lightning.pytorch as pl
    from helpers import write_base_checkpoint

    from lightning_lora.demo.classifiers import LitClassifier
    from lightning_lora.demo.mnist_datamodule import MNISTDataModule
    from lightning_lora.demo.nets import MLP
    from lightning_lora.errors import UsageError
    from lightning_lora.integration.callback import LoRAInjectionCallback

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".env").write_text("SECRET=1")
    write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[8]))
    model = LitClassifier(MLP(hidden_sizes=[8]), base_checkpoint=str(tmp_path / "base.ckpt"))
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        callbacks=[LoRAInjectionCallback(rank=2, adapter_dir=str(folder))],
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"adapter_dir: .*mine is not an adapter folder: it holds \.env"):
        trainer.fit(model, MNISTDataModule(data_dir=str(fake_mnist), batch_size=8))
    assert trainer.global_step == 0 and (folder / ".env").read_text() == "SECRET=1"


@pytest.mark.parametrize("verb", ["export", "merge", "report"])
def test_a_read_only_filesystem_is_named_with_the_output_not_a_temporary_or_a_bare_errno(
    lora_run, tmp_path, monkeypatch, capsys, verb, fake_mnist
):
    """Where the OS refuses before anything is written (mkdir, mkstemp, mkdtemp), the message names the output."""
    import tempfile

    root, _ = lora_run
    monkeypatch.chdir(root)

    def read_only(*args, **kwargs):
        prefix, folder = kwargs.get("prefix", ".x."), kwargs.get("dir", tmp_path)
        raise OSError(errno.EROFS, "Read-only file system", str(Path(folder) / f"{prefix}0wb166sn.tmp"))

    for name in ("mkdtemp", "mkstemp"):
        monkeypatch.setattr(tempfile, name, read_only)
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: read_only(dir=self.parent, prefix=f".{self.name}.1."))
    out = tmp_path / "out"
    run = ["--ckpt", "runs/finetune_lora", "--out", str(out)]
    report = ["--finetuned", "runs/finetune_lora", "--out", str(out), "--data-dir", str(fake_mnist)]
    args = {"export": run, "merge": run, "report": report}
    with pytest.raises(SystemExit) as exit_info:
        main([verb, *args[verb]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"cannot write {out}: its filesystem is mounted read-only (EROFS)" in err, err
    assert ".tmp" not in err and "Errno" not in err


def test_a_library_s_bare_write_error_is_named_and_its_thread_traceback_kept_quiet(tmp_path):
    import threading

    from lightning_lora.core.safe_io import explain_os_error
    from lightning_lora.integration import lightning_verbs

    full = OSError(errno.ENOSPC, "No space left on device")  # TensorBoard's writer: no file name
    assert str(explain_os_error(full, tmp_path / "run")) == (
        f"cannot write into {tmp_path / 'run'}: the device holding it is full (ENOSPC): free some space, "
        "or write elsewhere"
    )
    named = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / ".adapter.12.ab.tmp"))
    assert str(explain_os_error(named)).startswith(f"cannot write {tmp_path / 'adapter'}: your disk quota is used up")
    assert explain_os_error(OSError(errno.ENOENT, "No such file")) is None  # not a write cause: as it was
    seen = []
    original, lightning_verbs._THREAD_HOOK = lightning_verbs._THREAD_HOOK, seen.append
    try:
        for error in (full, ValueError("a real bug")):
            lightning_verbs._quiet_write_failures(threading.ExceptHookArgs((type(error), error, None, None)))
    finally:
        lightning_verbs._THREAD_HOOK = original
    assert [type(args.exc_value) for args in seen] == [ValueError]  # only the write failure is quiet
