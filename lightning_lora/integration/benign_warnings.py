"""The warnings and notices of Lightning, torch and jsonargparse that are known to be benign here.

Each is matched by its exact message (a regular expression anchored at its start) and carries
the reason it does not apply to this package's runs. ``lightning-lora`` installs these filters
before it imports Lightning; the test suite installs the same ones and turns every other
warning into an error, so a new warning is looked at before it is accepted.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Benign:
    """A message to silence: its regular expression, its category, and why it is benign."""

    message: str
    category: type[Warning]
    reason: str


WARNINGS = (
    Benign(
        re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        FutureWarning,
        "torch 2.10+ deprecates LeafSpec, which Lightning 2.6's own _pytree.py still builds; nothing of ours "
        "uses it and the behaviour is unchanged until torch removes the class.",
    ),
    Benign(
        re.escape("skip_none parameter was deprecated in v4.49.0"),
        DeprecationWarning,
        "Lightning 2.6's LightningCLI passes jsonargparse's old skip_none argument; it still works.",
    ),
    Benign(
        r"``(instantiate_classes|ArgumentParser\.add_instantiator)`` was deprecated in v4\.49\.0",
        DeprecationWarning,
        "LightningCLI 2.6 calls jsonargparse methods renamed in 4.49; the old names still work.",
    ),
    Benign(
        re.escape("By default only one JsonargparseDeprecationWarning per type is shown"),
        DeprecationWarning,
        "jsonargparse's preface to the skip_none notice above.",
    ),
    Benign(
        r"It is recommended to use `self\.log\('(val|test)/[^']+', \.\.\., sync_dist=True\)`",
        Warning,
        "Our val/ and test/ values are computed by torchmetrics objects, whose compute() already gathers "
        "every DDP rank; averaging them again across ranks would change nothing.",
    ),
    Benign(
        re.escape("Precision bf16-mixed is not supported by the model summary"),
        Warning,
        "Only the summary's size estimate (MB) is affected, which it then gives for fp32; training is not.",
    ),
    Benign(
        r"The dirpath has changed from .* won't be reloaded",
        Warning,
        "Every run (a resumed or tested one too) writes into its own version folder, by design; the "
        "ModelCheckpoint of the new run then starts its own top-k list, which is what we want.",
    ),
    Benign(
        r"The '(val|test|predict)_dataloader' does not have many workers",
        Warning,
        "MNIST is served from memory in whole batches (TensorBatchDataset); worker processes would only add copying.",
    ),
    Benign(
        r"The 'train_dataloader' does not have many workers",
        Warning,
        "As above: the training batches are gathered from a tensor in memory, faster than any worker.",
    ),
)

NOTICES = (
    Benign(
        re.escape("💡 Tip: For seamless cloud logging and experiment tracking"),
        Warning,
        "Lightning 2.6 advertises its cloud logger at every run; runs here log to TensorBoard.",
    ),
    Benign(
        re.escape("💡 Tip: For seamless cloud uploads and versioning"),
        Warning,
        "Lightning 2.6 advertises its cloud model registry with checkpoints; checkpoints here stay local.",
    ),
)
"""Info-level log lines (not warnings) from Lightning that are advertising, not information."""


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(re.match(notice.message, message) for notice in NOTICES)


_NOTICE_FILTER = _DropNotices()


def install() -> None:
    """Silence exactly the benign warnings and notices above (idempotent)."""
    for benign in WARNINGS:  # some messages start with a newline and indentation
        warnings.filterwarnings("ignore", message=r"\s*" + benign.message, category=benign.category)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logger = logging.getLogger(name)
        if _NOTICE_FILTER not in logger.filters:
            logger.addFilter(_NOTICE_FILTER)
