"""Python's and NumPy's global random generators, seeded and forked beside torch's.

``ExactResume`` seeds the generators a training step may draw from at every batch, and
``ResumableDataLoader`` fetches every batch with them seeded by its position: torch's, and
Python's ``random`` and NumPy's legacy global ``numpy.random`` (what ``random.random()`` and
``np.random.rand()`` in a ``training_step`` or a dataset's ``__getitem__`` draw from). NumPy is
seeded only when something imported it already. A ``numpy.random.default_rng()`` generator of
the user's own is not reached.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def seed_python_and_numpy(seed: int) -> None:
    """Seed Python's ``random`` and, if loaded, NumPy's global generator from ``seed``."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


@contextmanager
def forked_draws(seed: int) -> Iterator[None]:
    """torch's CPU, Python's and NumPy's global generators seeded from ``seed`` inside; as they were after."""
    numpy = sys.modules.get("numpy")
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        seed_python_and_numpy(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy_state is not None:
                numpy.random.set_state(numpy_state)


__all__ = ["forked_draws", "seed_python_and_numpy"]
