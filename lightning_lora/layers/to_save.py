"""Modules trained fully beside the adapters (``LoRAConfig.modules_to_save``)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModuleToSave(nn.Module):
    """A trainable copy of a module, with the frozen original kept beside it.

    Forward runs the copy while enabled and the original while disabled, so ``disable_lora``
    still gives the base model back bit for bit. The copy is an untied deep copy: training it
    never changes a tensor the original shares with another module.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.trained_module.requires_grad_(True)
        self.enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self.trained_module if self.enabled else self.original_module
        return active(*args, **kwargs)
