"""Optimizers: the paper's SGD with momentum and weight decay (default), or AdamW.

A small factory keyed by the config's ``optimizer``. The butterfly and lazy strategies apply
SGD's arithmetic to their own parameter shards, so they accept SGD only.

Parameter groups (:func:`param_groups`): the first holds every parameter without a group of
its own; ``norm_bias_lr_scale`` gives normalisation layers' parameters (airbench's BN biases)
``lr x scale`` and ``weight_decay / scale`` (the same decay per step); ``whiten_bias_epochs``
puts whitening convolutions' biases in a group whose lr drops to 0 from that epoch on (frozen,
so no weight decay or momentum moves them either). :func:`set_lr` applies both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepimage.config import TrainConfig
from deepimage.models.common import WhiteningConv
from deepimage.precision import needs_grad_scaler

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)

ParamGroups = list[dict[str, Any]]


def fused_sgd_supported(tensors: list[torch.Tensor]) -> bool:
    """Whether PyTorch's fused SGD kernel (one pass per tensor: decay, momentum and update
    together) runs on ``tensors``: floating point, on a device type it has a kernel for."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(t.device.type in devices and torch.is_floating_point(t) for t in tensors)


def in_layout_of(param: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with ``param``'s memory layout (a copy only where the strides differ).

    PyTorch's fused optimizer kernels on CPU walk every tensor of a parameter in memory order
    and assume one layout for all (torch 2.14): a channels_last weight with a contiguous
    momentum buffer (as ``load_state_dict`` restores it) or gradient updates wrong elements."""
    return t if t.stride() == param.stride() else torch.empty_like(param).copy_(t)


def _layouts_of_params(optimizer: torch.optim.Optimizer, *_: object) -> None:
    """Step pre-hook of a fused optimizer: gradients and state in each parameter's layout."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.stride() != p.stride():
                p.grad = in_layout_of(p, p.grad)
            state = optimizer.state.get(p)
            for key, value in (state or {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim():
                    state[key] = in_layout_of(p, value)


def _kernel(params: ParamGroups, cfg: TrainConfig) -> dict[str, bool]:
    """``fused=True`` where PyTorch has a fused kernel for every parameter's device (CPU and
    CUDA do: one pass per tensor, about 5x faster than ``foreach`` for SGD on CPU, the same
    arithmetic), else ``foreach=True``. Not under fp16's gradient scaler: the fused step it
    skips on inf leaves a first step's momentum buffers unwritten (torch 2.14)."""
    tensors = [p for group in params for p in group["params"]]
    if needs_grad_scaler(cfg.precision) or not fused_sgd_supported(tensors):
        return {"foreach": True}
    return {"fused": True}


def _sgd(params: ParamGroups, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=cfg.effective_lr(),
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        **_kernel(params, cfg),
    )


def _adamw(params: ParamGroups, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay, **_kernel(params, cfg)
    )


OPTIMIZERS: dict[str, Callable[[ParamGroups, TrainConfig], torch.optim.Optimizer]]
OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def param_groups(model: nn.Module, cfg: TrainConfig) -> ParamGroups:
    """The trainable parameters of ``model`` in groups (see the module docstring); one group
    when neither ``norm_bias_lr_scale`` nor ``whiten_bias_epochs`` asks for more."""
    late: set[int] = set()
    if cfg.whiten_bias_epochs > 0:
        late = {id(m.bias) for m in model.modules() if isinstance(m, WhiteningConv)
                and m.bias is not None}  # fmt: skip
    norm: set[int] = set()
    if cfg.norm_bias_lr_scale != 1.0:
        norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS)
                for p in m.parameters(recurse=False)}  # fmt: skip
    main, norms, lates = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (lates if id(p) in late else norms if id(p) in norm else main).append(p)
    groups: ParamGroups = [{"params": main, "name": "main"}]
    if norms:
        scale = cfg.norm_bias_lr_scale
        groups.append({"params": norms, "name": "norm", "lr_scale": scale,
                       "weight_decay": cfg.weight_decay / scale})  # fmt: skip
    if lates:
        groups.append({"params": lates, "name": "whiten_bias",
                       "frozen_from_epoch": cfg.whiten_bias_epochs})  # fmt: skip
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over every trainable parameter of ``model``."""
    optimizer = OPTIMIZERS[cfg.optimizer](param_groups(model, cfg), cfg)
    if optimizer.defaults.get("fused"):
        optimizer.register_step_pre_hook(_layouts_of_params)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float, epoch: int | None = None) -> None:
    """Set every group's lr: ``lr`` times the group's ``lr_scale``, 0 in a group frozen from
    an epoch on (when ``epoch`` is given)."""
    for group in optimizer.param_groups:
        frozen = group.get("frozen_from_epoch")
        if epoch is not None and frozen is not None and epoch >= frozen:
            group["lr"] = 0.0
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)
