"""MNIST served from memory, whole, or restricted to some digits.

The IDX files are read once and checked (:mod:`~lightning_lora.demo.mnist_files`); the images are
normalised into one float tensor and served whole batches at a time
(:mod:`~lightning_lora.demo.batch_data`).

The training loader resumes mid-epoch exactly: its order depends only on (seed, epoch), and it
tells Lightning how far into the epoch it is, so a resumed run continues with the next batch
(:class:`~lightning_lora.integration.resumable_loader.ResumableDataLoader`). The settings that
decide that order are :meth:`MNISTDataModule.resume_settings`, which ``ExactResume`` records and
compares on resume.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from lightning_lora.demo.batch_data import ReplayShuffle, TensorBatchDataset, keep_batch
from lightning_lora.demo.mnist_files import MNIST_FILES, normalise, read_mnist_split, rotate
from lightning_lora.integration.resumable_loader import EpochShuffle, ResumableDataLoader


def _validate_digits(digits: Any) -> list[int] | str | None:
    if digits is None or digits == "weakest":
        return digits
    if isinstance(digits, int) and not isinstance(digits, bool):
        digits = [digits]
    if isinstance(digits, str) or not isinstance(digits, (list, tuple)):
        raise ValueError(f"train_digits must be a digit 0-9, a list of them, 'weakest' or None, got {digits!r}")
    if not digits:
        raise ValueError("train_digits is empty; list at least one digit 0-9, or pass None for all ten")
    bad = [d for d in digits if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9]
    if bad:
        raise ValueError(f"train_digits must be digits 0-9, got {bad!r} in {list(digits)!r}")
    if len(set(digits)) != len(digits):
        dupes = sorted({d for d in digits if list(digits).count(d) > 1})
        raise ValueError(f"train_digits lists {dupes} more than once: {list(digits)!r}")
    return sorted(digits)


def replay_count(fraction: float, batch_size: int) -> int:
    """Samples of a batch replayed from the other digits: ``fraction * batch_size`` rounded to the nearest
    (halves to even, as Python rounds: 0.25 of 10 is 2)."""
    return round(fraction * batch_size)


DigitChoice = int | list[int] | Literal["weakest"] | None
"""How ``train_digits`` may be given: a digit, a list of digits, ``"weakest"``, or ``None`` (all)."""


class MNISTDataModule(pl.LightningDataModule):
    """Full MNIST, or fine-tuning on some digits while watching all the others.

    The training split is first divided into a training and a validation part (seeded, the
    same whatever the digits), then the training part is restricted to ``train_digits``. With
    digits chosen, validation has two sets, ``target`` (those digits) and ``retain`` (the
    others), so a run shows what it learns and what it forgets while it trains. The test split
    is always all ten digits.

    Args:
        data_dir: Folder holding ``MNIST/raw/`` (torchvision's layout).
        train_digits: Digits to train on: one digit (``9``), a list (``[4, 9]``), ``"weakest"``
            (the digit the model gets wrong most on the validation part, decided when the
            Trainer sets up, before any adapter exists), or ``None`` for all ten.
        val_fraction: Share of the training split held out for validation (before the digit
            filter, so every run of a base validates on the same images).
        batch_size: Samples per training batch.
        eval_batch_size: Samples per batch for validation, test and predict: evaluation keeps
            no activations for a backward pass, so large batches are much faster.
        val_per_digit: Validate during training on at most this many images of each digit (the
            same ones every time): a frequent live curve at a fraction of the cost. ``None``: all
            of the validation part. Deciding ``"weakest"`` always uses all of it.
        replay_fraction: Share of every training batch drawn from the other digits (replay of
            the old task, against forgetting); 0 turns replay off. Needs ``train_digits``.
        rotation: Rotate every image (all splits) by this many degrees, counter-clockwise: the
            same digits as a new task (the rank sweep).
        seed: Seed of the train/validation split and of the training order (independent of
            the training seed).
        download: Try to download MNIST when it is missing (fails cleanly offline).
        device_resident: Keep every split on the Trainer's device (about 200 MB for MNIST) and
            gather each batch there, so no images or labels cross from the host during a run; only
            the batch's index list does (8 bytes a sample). On a CUDA GPU a small network's step is
            otherwise dominated by host-to-device copies. A no-op on the CPU.
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str = "data",
        train_digits: DigitChoice = None,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_per_digit: int | None = None,
        replay_fraction: float = 0.0,
        rotation: float = 0.0,
        seed: int = 42,
        download: bool = True,
        device_resident: bool = False,
    ) -> None:
        super().__init__()
        self.train_digits = _validate_digits(train_digits)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        sizes = (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("val_per_digit", val_per_digit))
        for name, value in sizes:
            if (value is not None or name != "val_per_digit") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        not_a_number = isinstance(replay_fraction, bool) or not isinstance(replay_fraction, (int, float))
        if not_a_number or not 0 <= replay_fraction < 1:
            raise ValueError(f"replay_fraction must be a number in [0, 1), got {replay_fraction!r}")
        if replay_fraction and self.train_digits is None:
            raise ValueError("replay_fraction needs train_digits: replay mixes the other digits into their batches")
        self.replay_per_batch = replay_count(replay_fraction, batch_size)
        if replay_fraction and not 1 <= self.replay_per_batch < batch_size:
            raise ValueError(
                f"replay_fraction {replay_fraction} of a batch of {batch_size} is {replay_fraction * batch_size:g} "
                "samples; it must round to at least 1 and leave at least 1 for the trained digits"
            )
        if isinstance(rotation, bool) or not isinstance(rotation, (int, float)) or not math.isfinite(rotation):
            raise ValueError(f"rotation must be a number of degrees, got {rotation!r}")
        if Path(data_dir).exists() and not Path(data_dir).is_dir():
            raise ValueError(f"data_dir {data_dir!r} is a file; pass the folder that holds MNIST/raw/")
        self.data_dir = str(data_dir)
        self.val_fraction = float(val_fraction)
        self.batch_size, self.eval_batch_size, self.val_per_digit = batch_size, eval_batch_size, val_per_digit
        self.replay_fraction, self.rotation = float(replay_fraction), float(rotation)
        self.seed = seed
        self.download = download
        if not isinstance(device_resident, bool):
            raise ValueError(f"device_resident must be true or false, got {device_resident!r}")
        self.device_resident = device_resident
        self.save_hyperparameters()
        self.train_set: TensorBatchDataset | None = None  # the whole training part: every digit
        self.val_set: TensorBatchDataset | None = None  # the whole validation part
        self.test_set: TensorBatchDataset | None = None
        self._parts_cache: tuple[Any, dict[str, TensorBatchDataset]] = (None, {})

    @property
    def raw_folder(self) -> Path:
        return Path(self.data_dir) / "MNIST" / "raw"

    @property
    def target_digits(self) -> list[int] | None:
        """The digits trained on, once known (``"weakest"`` is decided in ``setup``); ``None``: all."""
        return self.train_digits if isinstance(self.train_digits, list) else None

    @property
    def val_set_names(self) -> list[str] | None:
        """Names of the validation sets, in the order of :meth:`val_dataloader` (``None``: one set)."""
        parts = self._val_parts()
        return None if parts is None or self.target_digits is None else list(parts)

    def _missing_files(self) -> list[str]:
        return [name for name in MNIST_FILES if not (self.raw_folder / name).is_file()]

    def prepare_data(self) -> None:
        """Check the files (downloading them if allowed); never leave empty folders behind."""
        if not self._missing_files():
            return
        reason = "download=False"
        if self.download:
            reason = self._try_download()
            if reason is None:
                return
        raise FileNotFoundError(
            f"MNIST is not in {self.raw_folder} and could not be downloaded ({reason}). "
            f"Expected the files {', '.join(MNIST_FILES)} (uncompressed, torchvision layout). "
            "Online, torchvision downloads them into data_dir (download: true); offline, point data_dir at a "
            "folder that holds MNIST/raw/: --data.data_dir /path/to/folder (make demo DATA_DIR=/path/to/folder)"
        )

    def _try_download(self) -> str | None:
        """Download into ``data_dir``; on failure remove the folders this call created."""
        from torchvision.datasets import MNIST  # torchvision only downloads; our reader checks the files

        created = [p for p in (Path(self.data_dir), self.raw_folder.parent, self.raw_folder) if not p.exists()]
        try:
            MNIST(self.data_dir, train=True, download=True)
            return None
        except Exception as err:  # torchvision raises RuntimeError or URLError, with many mirrors' texts
            for folder in created:
                shutil.rmtree(folder, ignore_errors=True)
            return str(err).strip().splitlines()[0]

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self._missing_files():
            self.prepare_data()  # raises the clear error (setup can run without prepare_data)
        images, labels = read_mnist_split(self.raw_folder, train)
        if self.rotation:
            images = rotate(images, self.rotation)
        return normalise(images), labels

    def _split(self) -> None:
        """The training and validation parts of the training split (all digits; the filter comes later)."""
        if self.train_set is not None:
            return
        images, labels = self._load_split(train=True)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(self.val_fraction * len(labels)))
        if n_val >= len(labels):
            raise ValueError(f"val_fraction {self.val_fraction} leaves no training samples of {len(labels)}")
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorBatchDataset(images[train], labels[train])
        self.val_set = TensorBatchDataset(images[val], labels[val])

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self._split()
            if self.train_digits == "weakest":
                self.pick_weakest(self._trainer_model())
        if stage == "fit" and self.target_digits is not None:
            if not len(self._train_indices(target=True)):
                raise ValueError(f"the training part holds no images of digits {self.target_digits}")
            if self.replay_fraction:
                rank_zero_info(
                    f"replay_fraction {self.replay_fraction:g}: {self.replay_per_batch} of every {self.batch_size} "
                    f"samples ({self.replay_per_batch / self.batch_size:.0%}) come from the other digits"
                )
            if self.replay_fraction and not len(self._train_indices(target=False)):
                raise ValueError(f"replay_fraction needs other digits than {self.target_digits} in the training part")
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = TensorBatchDataset(*self._load_split(train=False))
        if self.device_resident:
            self._move_to(self._trainer_device())

    def _trainer_device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _move_to(self, device: torch.device) -> None:
        """Put the splits on ``device`` (``device_resident``); the CPU keeps them where they are."""
        if device.type == "cpu":
            return
        for name in ("train_set", "val_set", "test_set"):
            dataset = getattr(self, name)
            if dataset is not None and dataset.targets.device != device:
                setattr(self, name, TensorBatchDataset(dataset.inputs.to(device), dataset.targets.to(device)))

    def _trainer_model(self) -> torch.nn.Module:
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None:
            raise ValueError(
                "train_digits='weakest' needs the model: use the DataModule with a Trainer (it decides in setup, "
                "with the base model, before any adapter), or call pick_weakest(model) first"
            )
        return model

    def pick_weakest(self, model: torch.nn.Module) -> int:
        """Decide ``"weakest"``: the digit ``model`` gets wrong most on the validation part (ties: the smaller).

        It becomes ``train_digits`` (``[digit]``), is printed, and is recorded in checkpoints.
        """
        self._split()
        was_training = model.training
        model.eval()
        wrong = torch.zeros(self.num_classes, dtype=torch.long)
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                for start in range(0, len(self.val_set), self.eval_batch_size):
                    x, y = self.val_set[start : start + self.eval_batch_size]
                    y = y.cpu()
                    preds = model(x.to(device)).argmax(dim=-1).cpu()
                    wrong += torch.bincount(y[preds != y], minlength=self.num_classes)
        finally:
            model.train(was_training)
        digit = int(wrong.argmax())
        counts = torch.bincount(self.val_set.targets.cpu(), minlength=self.num_classes)
        rank_zero_info(
            f"train_digits 'weakest': digit {digit}, the one the model gets wrong most on the validation part "
            f"({int(wrong[digit])} of {int(counts[digit])} wrong; per digit 0-9: {wrong.tolist()})"
        )
        self.train_digits = [digit]
        return digit

    def _train_indices(self, target: bool) -> torch.Tensor:
        """Indices into the training part (on the CPU, where the samplers shuffle them)."""
        labels = self.train_set.targets.cpu()
        inside = torch.isin(labels, torch.tensor(self.target_digits))
        return (inside if target else ~inside).nonzero().flatten()

    def _val_parts(self) -> dict[str, TensorBatchDataset] | None:
        """The validation sets: ``target`` and ``retain`` (each when not empty), or ``{"all": ...}`` for
        a run on every digit; each capped at ``val_per_digit`` images of a digit."""
        if self.val_set is None:
            return None
        key = (id(self.val_set), tuple(self.target_digits or ()), self.val_per_digit)
        if self._parts_cache[0] != key:
            labels = self.val_set.targets
            keep = torch.ones_like(labels, dtype=torch.bool)
            if self.val_per_digit is not None:  # the first ones of each digit in the (random) validation order
                rank = torch.zeros_like(labels)
                for digit in range(self.num_classes):
                    where = (labels == digit).nonzero().flatten()
                    rank[where] = torch.arange(len(where), device=labels.device)
                keep = rank < self.val_per_digit
            if self.target_digits is None:
                sets = {"all": keep}
            else:
                inside = torch.isin(labels, torch.tensor(self.target_digits, device=labels.device))
                sets = {"target": keep & inside, "retain": keep & ~inside}
            parts = {name: TensorBatchDataset(self.val_set.inputs[m], labels[m]) for name, m in sets.items() if m.any()}
            self._parts_cache = (key, parts)
        return self._parts_cache[1]

    def _eval_loader(self, dataset: TensorBatchDataset | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("MNISTDataModule.setup() has not built this split yet")
        return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=keep_batch)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch); after a mid-epoch resume it continues where the run stopped."""
        if self.train_set is None:
            return self._eval_loader(None)
        if self.target_digits is None:
            sampler: Sampler[int] = EpochShuffle(torch.arange(len(self.train_set)), self.seed)
        elif self.replay_fraction:
            trained, others = self._train_indices(target=True), self._train_indices(target=False)
            sampler = ReplayShuffle(trained, others, self.batch_size, self.replay_per_batch, self.seed)
        else:
            sampler = EpochShuffle(self._train_indices(target=True), self.seed)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=keep_batch)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        parts = self._val_parts()
        if parts is None:
            return self._eval_loader(None)
        if self.target_digits is None:
            return self._eval_loader(parts["all"])
        return [self._eval_loader(part) for part in parts.values()]

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def resume_settings(self) -> dict[str, Any]:
        """What decides the training data and its order (``ExactResume`` records and compares them).

        ``train_digits`` as decided (``"weakest"`` is a digit by then).
        """
        return {
            "train_digits": self.target_digits,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "replay_fraction": self.replay_fraction,
            "rotation": self.rotation,
        }

    def state_dict(self) -> dict[str, Any]:
        """Recorded in checkpoints: the digits trained on (``"weakest"`` as decided), for the report."""
        return {"train_digits": self.target_digits}
