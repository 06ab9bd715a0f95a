"""LoRA for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, grouped convolutions included.

``A`` is a convolution with the base's kernel, stride, padding, dilation, padding mode and
groups, into ``rank`` channels per group; ``B`` is a 1x1 convolution back to the output channels,
with the same groups. So each group gets its own rank-``r`` update and ``B A`` lives exactly in
the grouped weight: merging is exact (PEFT's ``A`` ignores groups, dilation and padding mode, and
cannot merge a grouped convolution). With ``groups=1`` the factors have PEFT's shapes:
``A`` (r, in, *kernel), ``B`` (out, r, 1, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.core.layers.base import LoRAAdapter, LoRALayer

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConv(LoRALayer):
    """``nn.Conv1d``/``Conv2d``/``Conv3d``: ``A`` (groups * r, in / groups, *kernel), ``B`` (out, r, 1, ...)."""

    copied_attributes = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )

    plain_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def probe_input(self) -> torch.Tensor:
        sides = [(k - 1) * d + 5 for k, d in zip(self.kernel_size, self.dilation, strict=True)]
        weight = self.base_weight()
        count = self.in_channels * math.prod(sides)
        values = torch.linspace(-1, 1, count, device=weight.device, dtype=weight.dtype)
        return values.reshape(1, self.in_channels, *sides)

    @property
    def pad_amounts(self) -> list[int]:
        """What ``F.pad`` takes for a non-zero padding mode: per dimension (last first), before and after.

        ``padding="same"`` puts the odd pixel after, as ``nn.ConvNd`` does.
        """
        amounts: list[int] = []
        for k, d, p in reversed(list(zip(self.kernel_size, self.dilation, self._padding_per_dim(), strict=True))):
            if p == "same":
                total = d * (k - 1)
                amounts += [total // 2, total - total // 2]
            else:
                amounts += [p, p]
        return amounts

    def _padding_per_dim(self) -> list[int | str]:
        if self.padding == "valid":
            return [0] * self.spatial_dims
        if self.padding == "same":
            return ["same"] * self.spatial_dims
        return list(self.padding)

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_size)

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ones = (1,) * self.spatial_dims
        return (self.groups * rank, self.in_channels // self.groups, *self.kernel_size), (
            self.out_channels,
            rank,
            *ones,
        )

    def _convolve(self, x, weight, bias, groups: int, with_geometry: bool) -> torch.Tensor:
        conv = _CONV_FUNCTIONS[self.spatial_dims]
        if not with_geometry:  # the 1x1 B convolution
            return conv(x, weight, bias, 1, 0, 1, groups)
        if self.padding_mode != "zeros":  # as nn.ConvNd._conv_forward does, op for op
            x = F.pad(x, self.pad_amounts, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._convolve(x, weight, bias, self.groups, with_geometry=True)

    def update(self, x: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        hidden = self._convolve(x.to(adapter.lora_A.dtype), adapter.lora_A, None, self.groups, with_geometry=True)
        return self._convolve(hidden * adapter.scale, adapter.lora_B, None, self.groups, with_geometry=False)

    def lora_weight(self, adapter: LoRAAdapter) -> torch.Tensor:
        groups, rank = self.groups, adapter.rank
        per_group_A = adapter.lora_A.float().reshape(groups, rank, -1)  # (g, r, in/g * kernel)
        per_group_B = adapter.lora_B.float().reshape(groups, self.out_channels // groups, rank)  # (g, out/g, r)
        return torch.bmm(per_group_B, per_group_A).reshape(self.base_weight().shape)

    def factor_groups(self) -> int:
        return self.groups

    def is_batched(self, x: torch.Tensor) -> bool:
        return x.dim() == self.spatial_dims + 2  # (channels, *spatial) is one unbatched sample

    def output_shape(self) -> tuple[int, ...]:
        return (1, self.out_channels, *(1,) * self.spatial_dims)
