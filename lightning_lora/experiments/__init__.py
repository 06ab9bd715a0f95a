"""The experiments behind the README: reports on runs, sweeps, and the README's tables.

Numbers are computed in :mod:`~lightning_lora.experiments.evaluate`; the writers in
:mod:`~lightning_lora.experiments.render` and :mod:`~lightning_lora.experiments.figures` only format
them (Markdown, figures).

May import: ``demo``, ``integration``, ``core``, ``errors`` (and Lightning, through the
``lightning-lora`` runs it starts); never ``cli``.
"""
