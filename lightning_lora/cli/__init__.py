"""TODO"""

from lightning_lora.cli.main import main

__all__ = ["main"]
