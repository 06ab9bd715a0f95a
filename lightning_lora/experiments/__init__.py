"""The experiments behind the README: reports on runs, sweeps, and the README's tables.

Numbers are computed in :mod:`~lightning_lora.experiments.evaluate`; the writers in
:mod:`~lightning_lora.experiments.render` only format them (Markdown, figures).
"""
