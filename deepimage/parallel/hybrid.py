"""Model-data (hybrid) parallelism (paper 3.2): convolutions data-parallel, FC layers split.

Krizhevsky's "one weird trick" scheme. The convolutional trunk is replicated and trained
data-parallel on each rank's slice of the global batch, its gradients synchronised by the
chosen strategy (ddp, butterfly or lazy). Every fully-connected layer is split by output
units: rank r holds rows ``[lo_r, hi_r)`` of each weight and bias (:func:`shard_bounds`), so
the FC parameters and their optimizer state are held about 1/N per rank. Per step:

1. the conv features of every rank are all-gathered (rows of the global batch);
2. each rank computes its column slice of the first FC layer for the whole global batch;
   ReLU and dropout act on the slice; the slices are all-gathered (columns) before the next
   FC layer, which again computes only this rank's columns, and so on to the logits;
3. each rank keeps the logits of its own images and computes its loss on them.

Every gather is a differentiable collective whose backward is a reduce-scatter: the gradient
of the gathered activations is summed over the ranks that used them and scattered back to the
rank that produced them, so the gradients of the conv features reach the ranks owning the
images. Each rank's loss is the mean over its own images, so the FC gradients arrive summed
over ranks and are divided by N (the conv gradients are averaged by the sync strategy).

Dropout masks are keyed by image and unit (:class:`~deepimage.models.common.KeyedDropout`):
the sharded dropout draws, for the global batch's images, exactly the masks that one process
draws for the same columns, so the weights do not depend on N.

No rank ever holds a whole FC layer. Built under
:func:`~deepimage.models.common.deferred_fc_init`, the layers get each rank's rows alone, with
the values the one-process model has there. For checkpoints, :class:`HybridStrategy` hands out
the FC weights and momentum as :class:`~deepimage.parallel.collectives.RowShards`, which
:func:`deepimage.runs.save_state` streams to rank 0 one rank's rows at a time into the same
unsharded file a one-process run writes; on load every rank reads only its rows from the file
(:meth:`HybridStrategy.stored_lazily`). So a run resumes on any N and ``RUN/model.safetensors``
loads into a plain one-process model.

The collectives are in :mod:`deepimage.parallel.collectives`, the sharded classifier in
:mod:`deepimage.parallel.head`; this module holds the strategy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from deepimage.parallel import dist as pdist
from deepimage.parallel.base import SyncStrategy, sgd_update_many_
from deepimage.parallel.collectives import RowShards
from deepimage.parallel.head import HybridHead, ShardedLinear
from deepimage.parallel.registry import build_strategy
from deepimage.runs import state_key


class _HybridModule(nn.Module):
    """What the loop trains: the wrapped (e.g. DDP) trunk, then the sharded head."""

    def __init__(self, features: nn.Module, head: HybridHead) -> None:
        super().__init__()
        self.features, self.classifier = features, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class HybridStrategy(SyncStrategy):
    """Conv gradients through ``sync`` (ddp/butterfly/lazy); FC shards updated locally.

    ``model.classifier`` must already be a :class:`HybridHead` (:func:`shard_classifier`);
    ``optimizer`` holds the trunk's trainable parameters first, then the shards' (the order of
    ``model.parameters()``), so its state has the indices of the unsharded model's.
    """

    name = "hybrid"
    shards_fc_layers = True
    collective_forward = True  # the sharded head gathers across ranks

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sync: str = "ddp",
        *,
        bucket_mb: float = 25.0,
    ) -> None:
        super().__init__(model, optimizer)
        head = model.classifier
        if not isinstance(head, HybridHead):
            raise ValueError("HybridStrategy needs shard_classifier(model) first")
        self.head = head
        self.sync = sync
        self.inner = build_strategy(sync, model.features, optimizer, bucket_mb=bucket_mb)
        self.stats = self.inner.stats
        head.stats = self.stats  # one set of counters: conv sync and activation exchange
        self.sharded = [  # every split tensor, trainable or not: gathered for checkpoints
            (f"classifier.{n}.{pn}", m, p)
            for n, m in self.head.sharded().items()
            for pn, p in m.named_parameters()
        ]
        position = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
        self.fc_params = [entry for entry in self.sharded if id(entry[2]) in position]
        self.fc_index = [position[id(p)] for _, _, p in self.fc_params]
        self.fc_momentum: list[torch.Tensor | None] = [None] * len(self.fc_params)
        self._lazy = {state_key("model", name) for name, _, _ in self.sharded}
        self._lazy_state = {state_key("optimizer", "state", i) for i in self.fc_index}

    # training -------------------------------------------------------------------------------

    def wrap(self) -> nn.Module:
        trunk = self.inner.wrap()
        return self.model if trunk is self.model.features else _HybridModule(trunk, self.head)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return self.inner.micro_step(last)

    @torch.no_grad()
    def step(self) -> None:
        # each rank's loss is the mean over its own images: FC gradients arrive summed over N
        for _, _, p in self.fc_params:
            if p.grad is not None and self.world > 1:
                p.grad.div_(self.world)
        self.inner.step()  # ddp: the optimizer updates trunk and shards; otherwise the trunk
        if self.inner.steps_optimizer:
            return
        idx = [i for i, (_, _, p) in enumerate(self.fc_params) if p.grad is not None]
        params = [self.fc_params[i][2] for i in idx]
        bufs = sgd_update_many_(
            params, [p.grad for p in params], [self.fc_momentum[i] for i in idx], **self.hyper
        )
        for i, buf in zip(idx, bufs):
            self.fc_momentum[i] = buf

    def zero_grad(self) -> None:
        self.inner.zero_grad()
        for _, _, p in self.fc_params:
            p.grad = None

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    # full, unsharded state, never held whole -------------------------------------------

    def _rows(self, shard: torch.Tensor, layer: ShardedLinear) -> torch.Tensor | RowShards:
        if self.world == 1:
            return shard.detach()
        return RowShards(shard, layer.widths, self.rank)

    def stored_lazily(self, key: str) -> bool:
        """Whether a checkpoint tensor is one of the FC weights or their optimizer state:
        each rank reads only its rows of those (see :func:`deepimage.runs.load_state`)."""
        return key in self._lazy or key.rpartition(".")[0] in self._lazy_state

    def model_state_dict(self) -> dict[str, Any]:
        """The full model's state dict, the FC layers as :class:`RowShards` (collective when
        saved)."""
        state: dict[str, Any] = dict(self.model.state_dict())
        for name, layer, _ in self.sharded:
            state[name] = self._rows(state[name], layer)
        return state

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        """Load full weights (tensors or :class:`~deepimage.runs.StoredTensor`), keeping this
        rank's rows of every FC layer."""
        state = dict(state)
        for name, layer, _ in self.sharded:
            full = state[name]
            if full.shape[0] != layer.full_out:
                raise ValueError(f"{name}: {full.shape[0]} rows, the model has {layer.full_out}")
            state[name] = full[layer.lo : layer.hi]
        self.model.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state in the full model's format, independent of N, the FC entries as
        :class:`RowShards` (collective)."""
        state = self.inner.state_dict()
        per_param = dict(state.get("state", {}))
        for i, (_, layer, p) in enumerate(self.fc_params):
            idx = self.fc_index[i]
            if self.inner.steps_optimizer:
                entry = per_param.get(idx)
            else:
                m = self.fc_momentum[i]
                entry = None if m is None else {"momentum_buffer": m}
            has = torch.tensor([entry is not None], dtype=torch.int64)
            pdist.all_reduce_([has], op="all_reduce(hybrid optimizer state)")
            if int(has) == 0:
                per_param.pop(idx, None)
                continue
            full = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    full[key] = self._rows(value, layer)
                else:
                    full[key] = value
            per_param[idx] = full
        return {"state": per_param, "param_groups": state["param_groups"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full optimizer state (tensors or stored), keeping this rank's rows of every
        FC entry."""
        per_param = dict(state.get("state", {}))
        mine: dict[int, dict[str, Any]] = {}
        for i, (_, layer, p) in enumerate(self.fc_params):
            idx = self.fc_index[i]
            entry = per_param.pop(idx, None) or per_param.pop(str(idx), None)
            if entry is None:
                continue
            sliced = {}
            for key, value in entry.items():
                if hasattr(value, "shape") and value.dim() and value.shape[0] == layer.full_out:
                    sliced[key] = value[layer.lo : layer.hi].to(p.device, p.dtype).clone()
                else:
                    sliced[key] = value
            mine[i] = sliced
            per_param[idx] = sliced
        if self.inner.steps_optimizer:
            self.optimizer.load_state_dict(
                {"state": per_param, "param_groups": state["param_groups"]}
            )
            return
        self.inner.load_state_dict(state)
        for i in range(len(self.fc_params)):
            entry = mine.get(i)
            self.fc_momentum[i] = None if entry is None else entry.get("momentum_buffer")


def build_hybrid(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, bucket_mb: float = 25.0
) -> HybridStrategy:
    """:class:`HybridStrategy` with conv sync ``name`` over ``model`` (already sharded by
    :func:`~deepimage.parallel.head.shard_classifier`); called like
    :func:`~deepimage.parallel.registry.build_strategy`."""
    return HybridStrategy(model, optimizer, name, bucket_mb=bucket_mb)
