"""LoRA+: ``B`` learns at ``ratio`` times ``A``'s learning rate (Hayou, Ghosh and Yu, 2024, arXiv:2402.12354).

With one rate for both factors, ``B`` (which starts at zero) learns too slowly in wide layers; the
paper shows that a larger rate for ``B`` (ratio 16 in its experiments) trains faster and better at
no extra cost. The groups are PEFT's (``create_loraplus_optimizer``), so a PEFT user's settings
carry over: ``lora_B`` and every other trainable 1-D tensor (DoRA magnitudes, trained biases) at
``lr * ratio``; an embedding layer's adapter at ``embedding_lr`` (PEFT's default 1e-6: the paper's
rule is for feature-learning layers, not lookups); everything else trainable (``lora_A``, copies
in ``modules_to_save``) at ``lr``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_lora.core.layers import LoRALayer
from lightning_lora.core.layers.embedding import LoRAEmbedding


def lora_plus_param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, embedding_lr: float = 1e-6
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: pass them to any ``torch.optim`` optimizer.

    Args:
        model: A model with adapters (``inject_lora``); only its trainable parameters are grouped.
        lr: ``A``'s learning rate.
        ratio: ``B``'s rate over ``A``'s (>= 1; the paper's experiments use 16).
        embedding_lr: The rate of embedding layers' adapters.

    Returns:
        Non-empty groups, each ``{"params": [...], "lr": ..., "name": ...}`` with ``name`` one of
        ``lora_plus_A``, ``lora_plus_B``, ``lora_plus_embedding``.

    Raises:
        ValueError: A rate that is not a positive finite number, a ratio below 1, or no trainable parameter.
    """
    for name, value in (("lr", lr), ("embedding_lr", embedding_lr), ("ratio", ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"lora_plus_param_groups: {name} must be a positive finite number, got {value!r}")
    if ratio < 1:
        raise ValueError(f"lora_plus_param_groups: ratio must be >= 1 (B learns faster than A), got {ratio}")
    if not any(isinstance(m, LoRALayer) for m in model.modules()):
        raise ValueError(
            "lora_plus_param_groups: the model holds no LoRA adapters, so LoRA+ has no B to speed up (its biases "
            "would train at ratio x lr); inject adapters first (inject_lora, or LoRAInjectionCallback / --lora.*), "
            "or train without LoRA+ (no lora_plus_ratio)"
        )
    embedding = {id(p) for m in model.modules() if isinstance(m, LoRAEmbedding) for p in m.parameters()}
    groups: dict[str, list[torch.Tensor]] = {"lora_plus_A": [], "lora_plus_B": [], "lora_plus_embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups["lora_plus_embedding"].append(param)
        elif name.rpartition(".")[2] == "lora_B" or param.ndim == 1:
            groups["lora_plus_B"].append(param)
        else:
            groups["lora_plus_A"].append(param)
    if not any(groups.values()):
        raise ValueError("lora_plus_param_groups: the model has no trainable parameter; inject adapters first")
    rates = {"lora_plus_A": lr, "lora_plus_B": lr * ratio, "lora_plus_embedding": embedding_lr}
    return [{"params": params, "lr": rates[name], "name": name} for name, params in groups.items() if params]
