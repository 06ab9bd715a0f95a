"""``python -m lightning_lora.cli``: the ``lightning-lora`` command, where the console script is not on the path."""

from lightning_lora.cli.main import main

main()
