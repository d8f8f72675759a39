"""Batch norm over the global batch on any backend (gloo included), for ``--sync-bn``.

``torch.nn.SyncBatchNorm`` only runs on CUDA tensors, so on the CPU/gloo path
:func:`convert_sync_batchnorm` swaps each ``nn.BatchNorm2d`` for :class:`SyncBatchNorm2d`,
which exchanges per-channel statistics in an autograd function: the forward pass
normalises with the statistics of the whole global batch and the backward pass all-reduces
the per-channel sums of ``dy`` and ``dy * (x - mean)`` (batch norm's closed-form gradient,
as torch's SyncBatchNorm does), so N processes compute what one process
computes on the whole batch (up to float summation order).

Each rank contributes ``(count, mean, M2)`` of its slice (``M2`` = sum of squared deviations
from the local mean) and the slices are combined with Chan's parallel formula, which is as
accurate as the one-process two-pass variance, unlike ``sum(x^2) - n mean^2``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span every rank of the process group.

    Same parameters, buffers and ``state_dict`` keys as ``nn.BatchNorm2d``; outside an
    initialised group of more than one process, or in eval mode, it *is* ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(x)
        self._check_input_dim(x)
        factor = self._momentum()
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32
        weight = self.weight if self.affine else torch.ones_like(xf[0, :, 0, 0])
        bias = self.bias if self.affine else torch.zeros_like(xf[0, :, 0, 0])
        y, mean, var, n = _SyncBatchNorm.apply(xf, weight, bias, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * (n / max(n - 1, 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)

    def _momentum(self) -> float:
        """Bump ``num_batches_tracked`` and return the running-stats factor, as BatchNorm does."""
        if not (self.track_running_stats and self.num_batches_tracked is not None):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


class _SyncBatchNorm(torch.autograd.Function):
    """Global-batch normalisation with the closed-form backward of ``nn.BatchNorm2d``: the
    forward all-reduces every rank's (count, mean, M2) row, the backward all-reduces the
    per-channel sums of ``dy`` and ``dy * (x - mean)``; parameter gradients stay local."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        dims = (0, 2, 3)
        n_local = x.numel() // x.shape[1]
        var_l, mean_l = torch.var_mean(x, dim=dims, correction=0)
        # An all-gather through a zero-padded all-reduce: every rank's (count, mean, M2) row.
        rows = x.new_zeros(world, 3, x.shape[1])
        rows[rank] = torch.stack([torch.full_like(mean_l, float(n_local)), mean_l, var_l * n_local])
        dist.all_reduce(rows)
        counts, means, m2s = rows[:, 0], rows[:, 1], rows[:, 2]
        n = float(counts[:, 0].sum())
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n
        invstd = torch.rsqrt(var + eps)
        shape = (1, -1, 1, 1)
        xmu = x - mean.view(shape)
        y = xmu * (invstd * weight).view(shape) + bias.view(shape)
        ctx.save_for_backward(xmu, weight, invstd)
        ctx.n = n
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):  # type: ignore[override]
        xmu, weight, invstd = ctx.saved_tensors
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy.clone()
        sums = torch.stack([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums)
        mean_dy, mean_dy_xmu = sums[0] / ctx.n, sums[1] / ctx.n
        grad_x = (dy - mean_dy.view(shape) - xmu * (invstd**2 * mean_dy_xmu).view(shape)) * (
            invstd * weight
        ).view(shape)
        return grad_x, grad_weight, grad_bias, None


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`SyncBatchNorm2d`, sharing its
    parameters and buffers, so names and ``state_dict`` keys stay those of the plain model."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        new = SyncBatchNorm2d(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=torch.device("meta"),
        )
        new._parameters = module._parameters
        new._buffers = module._buffers
        new.training = module.training
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            module.add_module(name, converted)
    return module
