"""The sharded classifier of hybrid parallelism: every FC layer cut to this rank's output units.

Rank r holds rows ``[lo_r, hi_r)`` of each weight and bias (:func:`shard_bounds`), so the FC
parameters and their optimizer state are held about 1/N per rank. The forward pass gathers
the conv features of the global batch, computes this rank's columns of each FC layer,
gathers the columns before the next one and returns the logits of this rank's own images.
Dropout masks are keyed by image and unit, so each rank draws, for its columns, exactly the
masks one process draws there.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deepimage.models import common
from deepimage.parallel import dist as pdist
from deepimage.parallel.base import CommStats, ring_bytes
from deepimage.parallel.collectives import (
    all_gather_into,
    gather_columns,
    gather_rows,
    gather_rows_raw,
)
from deepimage.rng import active_dropout_keys, use_dropout_keys


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


class ShardedLinear(nn.Linear):
    """Rows ``[lo, hi)`` of a ``Linear(in_features, full_out)``: this rank's output units.

    A ``full`` layer still on the meta device (:func:`~deepimage.models.common.deferred_fc_init`)
    is never built: the rows are initialised alone, with the values the whole layer has there
    (:func:`~deepimage.models.common.linear_rows`). Otherwise they are copied from ``full``.
    """

    def __init__(self, full: nn.Linear, lo: int, hi: int, widths: list[int]) -> None:
        deferred = full.weight.is_meta
        device = torch.get_default_device() if deferred else full.weight.device
        super().__init__(full.in_features, hi - lo, bias=full.bias is not None,
                         device=device, dtype=full.weight.dtype)  # fmt: skip
        self.full_out, self.lo, self.hi, self.widths = full.out_features, lo, hi, widths
        if deferred and device.type != "meta":
            weight, bias = common.linear_rows(full, lo, hi)
        else:
            weight, bias = full.weight[lo:hi], None if full.bias is None else full.bias[lo:hi]
        with torch.no_grad():
            self.weight.copy_(weight)
            if self.bias is not None:
                self.bias.copy_(bias)
        self.weight.requires_grad_(full.weight.requires_grad)  # frozen layers stay frozen
        if self.bias is not None:
            self.bias.requires_grad_(full.bias.requires_grad)

    def reset_parameters(self) -> None:
        """No initialisation (and no draw from the global RNG): the rows are copied in."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows=[{self.lo}, {self.hi}) of {self.full_out}"


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
                layers[name] = common.KeyedDropout(m.p, m.stream, first_unit=last.lo)
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
            all_gather_into(out, t)
        return [int(v) for v in out.tolist()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        counts = self._counts(b)
        keys = active_dropout_keys()
        batch_keys = None  # the keys of the global batch, which the FC layers see
        if keys is not None and self.training:
            if keys.rows.numel() != b:
                raise ValueError(f"dropout keys cover {keys.rows.numel()} images, the batch {b}")
            rows = keys.rows.reshape(-1, 1)
            if self.world > 1:
                self.stats.record(
                    "all_gather", ring_bytes("all_gather", 8 * self.world * max(counts), self.world)
                )
                with self.stats.blocking():
                    rows = gather_rows_raw(rows, counts, "all_gather(dropout keys)")
            batch_keys = dataclasses.replace(keys, rows=rows.reshape(-1))
        h, widths, gathered = x, None, False
        with use_dropout_keys(batch_keys):
            for m in self.children():
                if isinstance(m, ShardedLinear):
                    if not gathered:
                        h = gather_rows(h, counts, self.rank, self.stats)
                        gathered = True
                    elif widths is not None:
                        h = gather_columns(h, widths, self.rank, self.stats)
                    h, widths = m(h), m.widths
                else:
                    h = m(h)
        h = gather_columns(h, widths, self.rank, self.stats)
        lo = sum(counts[: self.rank])
        return h[lo : lo + b]


def shard_classifier(
    model: nn.Module, rank: int | None = None, world: int | None = None
) -> HybridHead:
    """Replace ``model.classifier`` by this rank's :class:`HybridHead`; return it.

    The full FC layers are dropped, so only 1/N of their parameters stays on this rank; built
    under :func:`~deepimage.models.common.deferred_fc_init`, they never existed.
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
