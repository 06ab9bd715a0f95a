"""DoRA's arithmetic (Liu et al., 2024, arXiv:2402.09353), shared by every layer type that defines it.

DoRA splits the adapted weight into a per-output magnitude ``m`` and a direction
``V = W + scale * B A``: ``W' = m * V / ||V||``, the norm taken per output. As the paper suggests
(section 4.3) ``||V||`` is a constant for the backward pass, and as PEFT does the bias is left out
of the magnitude scaling.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora.core.layers.adapter import LoRAAdapter


def autocast_off(device: torch.device):
    """Merges must not run under autocast: bf16 autocast makes them ~1000x less accurate."""
    return torch.autocast(device_type=device.type, enabled=False)


def robust_norm(weight: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The L2 norm over ``dims`` (kept), safe from overflow and underflow.

    Each slice is divided by the power of two at its largest magnitude first (exact), so weights
    of 1e-25 or 1e20 neither vanish nor overflow when squared in fp32.
    """
    peak = weight.detach().abs().amax(dim=dims, keepdim=True)
    power = torch.ldexp(torch.ones_like(peak), torch.frexp(peak).exponent)
    return torch.linalg.vector_norm(weight / power, dim=dims, keepdim=True) * power


class DoRAArithmetic:
    """The DoRA parts of :class:`~lightning_lora.core.layers.base.LoRALayer` (a mixin: it uses the layer's
    ``base_weight``, ``base_forward``, ``update``, ``output_shape`` and ``_lora_product``)."""

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||weight||`` per output, shaped like the output (DoRA)."""
        dims = tuple(d for d in range(weight.dim()) if d != self.output_dim_in_weight)
        return robust_norm(weight, dims).reshape(self.output_shape())

    def _as_weight_layout(self, per_output: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.base_weight().dim()
        shape[self.output_dim_in_weight] = -1
        return per_output.reshape(shape)

    def dora_factor(self, adapter: LoRAAdapter) -> torch.Tensor:
        """``m / ||W + scale * B A||``, the norm detached (DoRA section 4.3), shaped like the output.

        ``W`` is the base weight: each adapter is defined against the base alone.
        """
        base_weight = self.base_weight()
        with autocast_off(base_weight.device):
            norm = self.weight_norm(base_weight.float() + self._lora_product(adapter).detach()).detach()
        return adapter.lora_magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def dora_extra(self, x: torch.Tensor, out: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        """What a DoRA adapter adds to the base output, as PEFT computes it.

        ``(m/||V|| - 1) * W x + m/||V|| * scale * B A x``: exactly zero at initialisation. With
        dropout active the first term is taken on the dropped-out input as well (PEFT's choice).
        """
        factor = self.dora_factor(adapter)
        x_dropped = adapter.lora_dropout(x)
        if self.training and isinstance(adapter.lora_dropout, nn.Dropout):
            base_part = self.base_forward(x_dropped, self.base_weight(), None)
        elif self.merged:
            base_part = self.base_forward(x, self.base_weight(), None)
        else:
            base_part = out if self.bias is None else out - self.bias.reshape(self.output_shape())
        return (factor - 1) * base_part + factor * self.update(x_dropped, adapter)
