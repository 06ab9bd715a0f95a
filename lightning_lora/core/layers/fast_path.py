"""A faster low-rank branch for ``nn.Linear`` adapters on the CPU, where it was measured.

Autograd's generic backward for ``scale * x A^T B^T`` computes ``g @ B`` and ``g^T @ h``; at low
rank, on CPU BLAS, those shapes run about 3x slower than the same products taken as
``(B^T @ g^T)^T`` and ``(h^T @ g)^T``, and they are most of what LoRA adds to the frozen layer's
cost (``benchmarks/layer.py``). The hand-written Functions here take the fast layouts.

They step aside (:func:`use_fast_path` is False) wherever they were never measured faster or
cannot run: off the CPU (on an H100 they took 0.88-1.12x the plain ops' time, median 1.00x:
``benchmarks/results/gpu.json``), under ``torch.compile`` (Inductor fuses the plain ops anyway),
under autocast (autocast casts the plain ops), and where a dtype differs. ``torch.func``'s
``grad`` and ``vmap`` run through them (a generated vmap rule), and their backward is itself
differentiable, so double backward works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_fast_path(x: torch.Tensor, rank: int, *tensors: torch.Tensor) -> bool:
    """Whether the custom Functions should run for input ``x``, rather than plain ``F.linear`` ops.

    Only on the CPU, in eager mode, in full precision, and where they measured faster: at low
    rank, or with many rows. At rank 64 and batch 64 autograd's own ops are a little faster.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled(x.device.type) or any(t.dtype != x.dtype for t in tensors):
        return False
    return rank <= 8 or x.numel() // x.shape[-1] >= 256


def _low_rank_grads(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients for x, A and B of ``scale * x A^T B^T``, skinny products in their fast layouts."""
    x, lora_A, lora_B, hidden = ctx.saved_tensors
    first = 1 if ctx.adds_into_output else 0
    needs_x, needs_A, needs_B = ctx.needs_input_grad[first : first + 3]
    # Measured (benchmarks/layer.py): the transposed forms win 2-3x at rank <= 8 with a real
    # batch; at rank 64, or a batch of 10, BLAS's own layout is as fast or faster.
    if lora_B.shape[1] <= 8 and grad.shape[0] >= 32:
        grad_B = (hidden.t() @ grad).t() if needs_B else None  # (out, rank)
        grad_hidden = (lora_B.t() @ grad.t()).t() * ctx.scale  # (batch, rank)
    else:
        grad_B = grad.t() @ hidden if needs_B else None
        grad_hidden = (grad @ lora_B) * ctx.scale
    grad_A = grad_hidden.t() @ x if needs_A else None  # (rank, in)
    grad_x = grad_hidden @ lora_A if needs_x else None  # (batch, in)
    return grad_x, grad_A, grad_B


class _LowRankUpdate(torch.autograd.Function):
    """``scale * x A^T B^T`` for 2-D ``x`` (a new tensor).

    Written in the ``setup_context`` form with a generated vmap rule, so ``torch.func``
    transforms (``grad``, ``vmap``) run through it as through the plain ops.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, lora_A, lora_B, scale):
        hidden = (x @ lora_A.t()) * scale  # (batch, rank), kept for the backward
        return hidden @ lora_B.t(), hidden  # (batch, out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lora_A, lora_B, scale = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, lora_A, lora_B, output[1])
        ctx.scale, ctx.adds_into_output = scale, False

    @staticmethod
    def backward(ctx, grad, _):
        return (*_low_rank_grads(ctx, grad), None)


class _AddLowRankUpdate(torch.autograd.Function):
    """``out + scale * x A^T B^T``, with ``out`` as the matmul's accumulator (one ``addmm``).

    No separate (batch, out) update is materialised and no addition pass runs; the gradient of
    ``out`` passes through untouched. (Out of place: ``torch.func`` cannot transform a Function
    that writes into its input.)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(out, x, lora_A, lora_B, scale):
        hidden = (x @ lora_A.t()) * scale  # (batch, rank), kept for the backward
        return torch.addmm(out, hidden, lora_B.t()), hidden

    @staticmethod
    def setup_context(ctx, inputs, output):
        out, x, lora_A, lora_B, scale = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, lora_A, lora_B, output[1])
        ctx.scale, ctx.adds_into_output = scale, True

    @staticmethod
    def backward(ctx, grad, _):
        return (grad, *_low_rank_grads(ctx, grad), None)


def low_rank_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B (A x)`` over the last dimension of ``x``, never forming ``B A``."""
    if not use_fast_path(x, lora_A.shape[0], lora_A, lora_B):
        return F.linear(F.linear(x, lora_A) * scale, lora_B)  # scaling the (..., rank) tensor is cheapest
    flat = x.reshape(-1, x.shape[-1])
    return _LowRankUpdate.apply(flat, lora_A, lora_B, scale)[0].view(*x.shape[:-1], lora_B.shape[0])


def add_low_rank_update(
    out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> torch.Tensor:
    """``out + scale * B (A x)`` for a 2-D ``out``, accumulated inside the matmul where that is faster."""
    if use_fast_path(x, lora_A.shape[0], out, lora_A, lora_B):
        return _AddLowRankUpdate.apply(out, x, lora_A, lora_B, scale)[0]
    if x.dtype != lora_A.dtype:  # (casts only where needed: each op costs host time on a GPU)
        x = x.to(lora_A.dtype)
    update = F.linear(F.linear(x, lora_A) * scale, lora_B)
    return out + (update if update.dtype == out.dtype else update.to(out.dtype))
