"""One optimizer step's forward and backward, with autocast and gradient accumulation.

Shared by the training loop and the throughput benchmark, so the benchmark measures the
exact code path that trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from deepimage.precision import autocast
from deepimage.rng import dropout_keys


def forward_backward(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    accum_steps: int = 1,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    micro_step: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    dropout_key: tuple[torch.Tensor, int, int] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, torch.Tensor]:
    """Accumulate gradients of the mean loss over ``x`` in ``accum_steps`` micro-batches.

    ``micro_step(last)`` wraps each micro-batch (a gradient-sync strategy synchronises only
    on the last one); ``dropout_key = (rows, seed, step)`` keys dropout masks by image (see
    :func:`~deepimage.rng.dropout_keys`). ``scaler`` scales the loss (fp16; the
    caller steps through it). Returns the summed loss (for logging) and
    the detached float32 logits.
    """
    micro = len(x) // accum_steps
    loss_total = 0.0
    logits_all = []
    for start in range(0, len(x), micro):
        xb, yb = x[start : start + micro], labels[start : start + micro]
        last = start + micro >= len(x)
        keys = contextlib.nullcontext()
        if dropout_key is not None:
            rows, seed, step = dropout_key
            keys = dropout_keys(rows[start : start + micro], seed, step)
        sync = micro_step(last) if micro_step is not None else contextlib.nullcontext()
        with sync, keys:
            with autocast(x.device, precision):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_total += loss.item() * len(xb)
        logits_all.append(logits.detach().float())
    return loss_total, torch.cat(logits_all)
