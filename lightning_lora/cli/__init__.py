"""The ``lightning-lora`` command: verbs, exit codes, one-paragraph errors.

Owns: the entry point and dispatch (:mod:`.main`: LightningCLI's verbs ``fit``/``validate``/
``test``/``predict`` go to :mod:`lightning_lora.integration.lightning_verbs`) and the verbs that
train nothing: ``inspect``, ``export``, ``merge``, ``report`` (:mod:`.file_verbs`, which import no
Lightning); ``python -m lightning_lora.cli`` runs it too (:mod:`.__main__`); whether another
process of a DDP run stopped first, when this one fails in a collective (:mod:`.ddp_peers`).

May import everything below it: ``experiments``, ``demo``, ``integration``, ``core``. Nothing
imports it but the console script and the tests.
"""

from lightning_lora.cli.main import main

__all__ = ["main"]
