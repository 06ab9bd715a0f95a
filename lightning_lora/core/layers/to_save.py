"""Modules trained fully beside the adapters (``LoRAConfig.modules_to_save``)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModuleToSave(nn.Module):
    """A trainable copy of a module, with the frozen original kept beside it.

    Forward runs the copy while enabled and the original while disabled, so ``disable_lora``
    still gives the base model back bit for bit. The copy is an untied deep copy: training it
    never changes a tensor the original shares with another module. Attributes (``weight``,
    ``eps``, ``out_features``) are read from the module in use, so code around it keeps working.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.trained_module.requires_grad_(True)
        self.enabled = True
        self._attributes_forwarded = True  # from here on, unknown attributes come from the module in use

    def active(self) -> nn.Module:
        """The module forward runs: the trained copy, or the original while disabled."""
        return self.trained_module if self.enabled else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or not self.__dict__.get("_attributes_forwarded", False):
                raise
            return getattr(self.active(), name)
