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

:class:`HybridStrategy` gathers the FC shards into the full, unsharded weights and optimizer
state for checkpoints (collective) and cuts them again on load, so a run resumes on any N and
``RUN/model.safetensors`` loads into a plain one-process model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepimage.models import common
from deepimage.parallel import dist as pdist
from deepimage.parallel.strategy import (
    CommStats,
    SyncStrategy,
    build_strategy,
    ring_bytes,
    sgd_update_,
)

logger = logging.getLogger(__name__)

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def shard_bounds(n: int, world: int, start: int = 0) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges of ``n`` rows, one per rank, sizes differing by at most 1.

    The ``n % world`` larger ranges go to ranks ``start, start + 1, ...`` (mod ``world``), so
    successive layers can hand their remainders to different ranks and keep the totals even.
    """
    base, extra = divmod(n, world)
    sizes = [base + (1 if (r - start) % world < extra else 0) for r in range(world)]
    bounds, lo = [], 0
    for size in sizes:
        bounds.append((lo, lo + size))
        lo += size
    return bounds


# --- differentiable collectives --------------------------------------------------------------


def _gather_rows_raw(x: torch.Tensor, counts: Sequence[int], op: str) -> torch.Tensor:
    """Concatenate every rank's ``x`` (``counts[r]`` rows on rank r) along dimension 0."""
    world, m = len(counts), max(counts)
    device = pdist.comm_device()
    if x.shape[0] == m and x.device == device:  # no padding needed (training batches)
        padded = x.contiguous()
    else:
        padded = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=device)
        padded[: x.shape[0]] = x
    out = torch.empty((world * m, *x.shape[1:]), dtype=x.dtype, device=device)
    with pdist.guard(op):
        _all_gather(out, padded)
    if min(counts) < m:
        out = torch.cat([out[r * m : r * m + c] for r, c in enumerate(counts)])
    return out.to(x.device)


def _reduce_scatter_rows_raw(
    g: torch.Tensor, counts: Sequence[int], rank: int, op: str
) -> torch.Tensor:
    """Sum ``g`` (all ranks' rows) over ranks; return this rank's ``counts[rank]`` rows."""
    world, m = len(counts), max(counts)
    device = pdist.comm_device()
    if min(counts) == m and g.device == device:
        padded = g.contiguous()
    else:
        padded = torch.zeros((world * m, *g.shape[1:]), dtype=g.dtype, device=device)
        lo = 0
        for r, c in enumerate(counts):
            padded[r * m : r * m + c] = g[lo : lo + c]
            lo += c
    out = torch.empty((m, *g.shape[1:]), dtype=g.dtype, device=device)
    with pdist.guard(op):
        _reduce_scatter(out, padded)
    return out[: counts[rank]].to(g.device)


class _GatherRows(torch.autograd.Function):
    """All-gather along rows; backward: reduce-scatter of the gradient back to its owners."""

    @staticmethod
    def forward(ctx, x, counts, rank, stats):  # type: ignore[override]
        ctx.counts, ctx.rank, ctx.stats = counts, rank, stats
        world, m = len(counts), max(counts)
        row = _row_bytes(x)
        stats.record("all_gather", ring_bytes("all_gather", world * m * row, world))
        with stats.blocking():
            return _gather_rows_raw(x, counts, "all_gather(hybrid activations)")

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        counts, world = ctx.counts, len(ctx.counts)
        row = _row_bytes(g)
        ctx.stats.record("reduce_scatter", ring_bytes("rs", world * max(counts) * row, world))
        with ctx.stats.blocking():
            out = _reduce_scatter_rows_raw(
                g.contiguous(), counts, ctx.rank, "reduce_scatter(hybrid gradients)"
            )
        return out, None, None, None


def _row_bytes(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n * x.element_size()


def gather_rows(
    x: torch.Tensor, counts: Sequence[int], rank: int, stats: CommStats
) -> torch.Tensor:
    """Every rank's rows of ``x`` (the global batch), differentiably; identity on one rank."""
    if len(counts) == 1:
        return x
    return _GatherRows.apply(x.contiguous(), list(counts), rank, stats)


def gather_columns(
    x: torch.Tensor, widths: Sequence[int], rank: int, stats: CommStats
) -> torch.Tensor:
    """Concatenate every rank's column slice of ``x`` ([B, widths[r]]) into [B, sum(widths)]."""
    if len(widths) == 1:
        return x
    return gather_rows(x.t(), widths, rank, stats).t()


# --- the sharded head ------------------------------------------------------------------------


class ShardedLinear(nn.Linear):
    """Rows ``[lo, hi)`` of a ``Linear(in_features, full_out)``: this rank's output units."""

    def __init__(self, full: nn.Linear, lo: int, hi: int, widths: list[int]) -> None:
        super().__init__(full.in_features, hi - lo, bias=full.bias is not None,
                         device=full.weight.device, dtype=full.weight.dtype)  # fmt: skip
        self.full_out, self.lo, self.hi, self.widths = full.out_features, lo, hi, widths
        with torch.no_grad():
            self.weight.copy_(full.weight[lo:hi])
            if self.bias is not None:
                self.bias.copy_(full.bias[lo:hi])
        self.weight.requires_grad_(full.weight.requires_grad)  # frozen layers stay frozen
        if self.bias is not None:
            self.bias.requires_grad_(full.bias.requires_grad)

    def reset_parameters(self) -> None:
        """No initialisation (and no draw from the global RNG): the rows are copied in."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows=[{self.lo}, {self.hi}) of {self.full_out}"


class ShardedKeyedDropout(nn.Module):
    """:class:`KeyedDropout` on columns ``[lo, lo + width)``: the masks one process draws there.

    Inside :func:`~deepimage.models.common.dropout_keys` the mask of image ``i``, unit ``j``
    depends on (seed, step, image key, stream, j) only; the keys of the global batch are
    gathered from every rank. Outside that context it is ``nn.Dropout`` on the slice.
    """

    def __init__(self, p: float, stream: int, lo: int) -> None:
        super().__init__()
        self.p, self.stream, self.lo = float(p), int(stream), int(lo)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None, salt: int | None) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if rows is None or salt is None:
            return nn.functional.dropout(x, self.p, training=True)
        m32 = common._M32
        h = common._hash32
        base = h((rows.to(x.device) & m32) ^ h(torch.tensor(salt ^ self.stream, device=x.device)))
        units = h(torch.arange(self.lo, self.lo + x.shape[1], device=x.device, dtype=torch.int64))
        bits = h(base[:, None] ^ units[None, :])
        keep = ((bits >> 8).to(torch.float32) * (1.0 / (1 << 24))) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream}, first unit {self.lo}"


class HybridHead(nn.Sequential):
    """The classifier with every Linear cut to this rank's output rows.

    Same child names as the classifier it replaces, so its ``state_dict`` keys are the full
    model's (with sharded shapes). ``forward`` takes this rank's features and returns this
    rank's logits; it is collective: every rank must call it, batch sizes may differ.
    """

    def __init__(self, classifier: nn.Sequential, rank: int, world: int) -> None:
        layers: dict[str, nn.Module] = {}
        remainder_start = 0
        last: ShardedLinear | None = None
        for name, m in classifier.named_children():
            if isinstance(m, nn.Linear):
                bounds = shard_bounds(m.out_features, world, remainder_start)
                remainder_start = (remainder_start + m.out_features % world) % world
                lo, hi = bounds[rank]
                last = ShardedLinear(m, lo, hi, [b - a for a, b in bounds])
                layers[name] = last
            elif isinstance(m, common.KeyedDropout):
                if last is None:
                    raise ValueError("hybrid parallelism: dropout before the first FC layer")
                layers[name] = ShardedKeyedDropout(m.p, m.stream, last.lo)
            elif isinstance(m, nn.Dropout) and m.p > 0:
                raise ValueError(
                    "hybrid parallelism needs KeyedDropout (masks independent of the split)"
                )
            elif isinstance(m, nn.Flatten | nn.ReLU | nn.Identity | nn.Dropout):
                if isinstance(m, nn.Flatten) and last is not None:
                    raise ValueError("hybrid parallelism: Flatten after an FC layer")
                layers[name] = m
            else:
                raise ValueError(
                    f"hybrid parallelism splits Flatten/Linear/ReLU/Dropout heads, "
                    f"not {type(m).__name__}"
                )
        if last is None:
            raise ValueError("hybrid parallelism: the classifier has no fully-connected layer")
        super().__init__()
        for name, m in layers.items():
            self.add_module(name, m)
        self.rank, self.world = rank, world
        self.stats = CommStats()

    def sharded(self) -> dict[str, ShardedLinear]:
        """The sharded layers by child name."""
        return {n: m for n, m in self.named_children() if isinstance(m, ShardedLinear)}

    def _counts(self, b: int) -> list[int]:
        if self.world == 1:
            return [b]
        t = torch.tensor([b], dtype=torch.int64, device=pdist.comm_device())
        out = torch.empty(self.world, dtype=torch.int64, device=t.device)
        self.stats.record("all_gather", ring_bytes("all_gather", 8 * self.world, self.world))
        with self.stats.blocking(), pdist.guard("all_gather(hybrid batch sizes)"):
            _all_gather(out, t)
        return [int(v) for v in out.tolist()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        counts = self._counts(b)
        keys = common._active_keys
        rows = salt = None
        if keys is not None and self.training:
            if keys.rows.numel() != b:
                raise ValueError(f"dropout keys cover {keys.rows.numel()} images, the batch {b}")
            rows = keys.rows.reshape(-1, 1)
            if self.world > 1:
                self.stats.record(
                    "all_gather", ring_bytes("all_gather", 8 * self.world * max(counts), self.world)
                )
                with self.stats.blocking():
                    rows = _gather_rows_raw(rows, counts, "all_gather(dropout keys)")
            rows, salt = rows.reshape(-1), keys.salt
        h, widths, gathered = x, None, False
        for m in self.children():
            if isinstance(m, ShardedLinear):
                if not gathered:
                    h = gather_rows(h, counts, self.rank, self.stats)
                    gathered = True
                elif widths is not None:
                    h = gather_columns(h, widths, self.rank, self.stats)
                h, widths = m(h), m.widths
            elif isinstance(m, ShardedKeyedDropout):
                h = m(h, rows, salt)
            else:
                h = m(h)
        h = gather_columns(h, widths, self.rank, self.stats)
        lo = sum(counts[: self.rank])
        return h[lo : lo + b]


def shard_classifier(
    model: nn.Module, rank: int | None = None, world: int | None = None
) -> HybridHead:
    """Replace ``model.classifier`` by this rank's :class:`HybridHead`; return it.

    The full FC layers are dropped, so only 1/N of their parameters stays on this rank.
    """
    rank = pdist.rank() if rank is None else rank
    world = pdist.world_size() if world is None else world
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Sequential):
        raise ValueError("hybrid parallelism needs a model with an nn.Sequential classifier")
    head = HybridHead(classifier, rank, world)
    model.classifier = head
    return head


def fc_bytes(head: HybridHead) -> int:
    """Bytes of the FC parameters this rank holds."""
    return sum(p.numel() * p.element_size() for p in head.parameters())


# --- the strategy ----------------------------------------------------------------------------


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
        if self.sync == "ddp":
            return
        hyper = self.hyper
        for i, (_, _, p) in enumerate(self.fc_params):
            if p.grad is not None:
                self.fc_momentum[i] = sgd_update_(p, p.grad, self.fc_momentum[i], **hyper)

    def zero_grad(self) -> None:
        self.inner.zero_grad()
        for _, _, p in self.fc_params:
            p.grad = None

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    # full, unsharded state ---------------------------------------------------------------

    def _gather(self, shard: torch.Tensor, layer: ShardedLinear, what: str) -> torch.Tensor:
        if self.world == 1:
            return shard.detach().clone()
        x = shard.detach().to(pdist.comm_device())
        return _gather_rows_raw(x, layer.widths, f"all_gather({what})").to(shard.device)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model's state dict, FC layers gathered (collective)."""
        state = self.model.state_dict()
        for name, layer, _ in self.sharded:
            state[name] = self._gather(state[name], layer, "hybrid weights")
        return state

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full weights, keeping this rank's rows of every FC layer."""
        state = dict(state)
        for name, layer, _ in self.sharded:
            full = state[name]
            if full.shape[0] != layer.full_out:
                raise ValueError(f"{name}: {full.shape[0]} rows, the model has {layer.full_out}")
            state[name] = full[layer.lo : layer.hi]
        self.model.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state in the full model's format, independent of N (collective)."""
        state = self.inner.state_dict()
        per_param = dict(state.get("state", {}))
        for i, (_, layer, p) in enumerate(self.fc_params):
            idx = self.fc_index[i]
            if self.sync == "ddp":
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
                    full[key] = self._gather(value, layer, "hybrid optimizer state")
                else:
                    full[key] = value
            per_param[idx] = full
        return {"state": per_param, "param_groups": state["param_groups"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full optimizer state, keeping this rank's rows of every FC entry."""
        per_param = dict(state.get("state", {}))
        mine: dict[int, dict[str, Any]] = {}
        for i, (_, layer, p) in enumerate(self.fc_params):
            idx = self.fc_index[i]
            entry = per_param.pop(idx, None) or per_param.pop(str(idx), None)
            if entry is None:
                continue
            sliced = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() and value.shape[0] == layer.full_out:
                    sliced[key] = value[layer.lo : layer.hi].to(p.device, p.dtype).clone()
                else:
                    sliced[key] = value
            mine[i] = sliced
            per_param[idx] = sliced
        if self.sync == "ddp":
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
    :func:`shard_classifier`); called like :func:`~deepimage.parallel.strategy.build_strategy`."""
    return HybridStrategy(model, optimizer, name, bucket_mb=bucket_mb)
