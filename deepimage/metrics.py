"""Classification metrics: top-k accuracy, per-class accuracy and confusion counts.

The meter keeps only integer count tensors, so a partially accumulated meter can be saved in a
checkpoint and the state of several processes can be summed (e.g. with ``all_reduce``) exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClassificationMeter", "topk_correct"]


def _check_batch(logits: Tensor, targets: Tensor, num_classes: int | None = None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, C), got {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    c = logits.shape[1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f"logits have {c} classes, meter expects {num_classes}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= c):
        raise ValueError(
            f"targets out of range [0, {c}): min {int(targets.min())}, max {int(targets.max())}"
        )


def _topk_indices(logits: Tensor, k: int) -> Tensor:
    """Indices of the k largest logits per row, best first; ties go to the lower class index."""
    return torch.sort(logits.detach(), dim=1, descending=True, stable=True).indices[:, :k]


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Per-sample top-k hits: ``{k: bool tensor (B,)}`` for each requested ``k``.

    ``k`` is clipped to the number of classes, so top-5 of a 3-class problem is top-3 (always
    true). Ties rank the lower class index first (stable sort), so results are deterministic.
    """
    _check_batch(logits, targets)
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    num_classes = logits.shape[1]
    if not ks:
        return {}
    kmax = min(max(ks), num_classes)
    pred = _topk_indices(logits, kmax)  # (B, kmax), best first
    hits = pred == targets.to(pred.device).view(-1, 1)
    return {k: hits[:, : min(k, num_classes)].any(dim=1) for k in ks}


class ClassificationMeter:
    """Accumulates top-1/top-5 accuracy, per-class accuracy and confusion counts.

    State (all int64, on CPU), in the order of :meth:`state_tensors`:
    ``counts`` (C,) images per true class, ``correct1`` (C,) top-1 hits per class,
    ``correct5`` (C,) top-5 hits per class, ``confusion`` (C, C) rows = true class,
    cols = top-1 prediction, ``top5_pairs`` (C, C) count of (true class, each top-5 prediction).
    """

    TOPK = 5

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.k = min(self.TOPK, self.num_classes)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        c = self.num_classes
        self.counts = torch.zeros(c, dtype=torch.int64)
        self.correct1 = torch.zeros(c, dtype=torch.int64)
        self.correct5 = torch.zeros(c, dtype=torch.int64)
        self.confusion = torch.zeros(c, c, dtype=torch.int64)
        self.top5_pairs = torch.zeros(c, c, dtype=torch.int64)

    @property
    def n_images(self) -> int:
        return int(self.counts.sum())

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch of logits (B, C) (or probabilities) and integer targets (B,)."""
        _check_batch(logits, targets, self.num_classes)
        if targets.numel() == 0:
            return
        c, k = self.num_classes, self.k
        pred = _topk_indices(logits, k).cpu()  # (B, k)
        t = targets.detach().cpu().long()
        hits = pred == t.view(-1, 1)
        self.counts += torch.bincount(t, minlength=c)
        self.correct1 += torch.bincount(t[hits[:, 0]], minlength=c)
        self.correct5 += torch.bincount(t[hits.any(dim=1)], minlength=c)
        self.confusion += torch.bincount(t * c + pred[:, 0], minlength=c * c).view(c, c)
        pairs = t.repeat_interleave(k) * c + pred.reshape(-1)
        self.top5_pairs += torch.bincount(pairs, minlength=c * c).view(c, c)

    def state_tensors(self) -> list[Tensor]:
        """The state in a fixed order: counts, correct1, correct5, confusion, top5_pairs."""
        return [self.counts, self.correct1, self.correct5, self.confusion, self.top5_pairs]

    def load_state_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Replace the state with tensors from :meth:`state_tensors` (any device; copied)."""
        current = self.state_tensors()
        if len(tensors) != len(current):
            raise ValueError(f"expected {len(current)} state tensors, got {len(tensors)}")
        for new, old in zip(tensors, current):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(
                    f"state tensor shape {tuple(new.shape)} does not match {tuple(old.shape)}"
                )
        (self.counts, self.correct1, self.correct5, self.confusion, self.top5_pairs) = (
            t.detach().to("cpu", torch.int64).clone() for t in tensors
        )

    def merge(self, other: ClassificationMeter) -> None:
        """Add the counts of another meter (e.g. from another shard) to this one."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge meters with {other.num_classes} and {self.num_classes} classes"
            )
        for mine, theirs in zip(self.state_tensors(), other.state_tensors()):
            mine += theirs.to(mine.device)

    def results(self) -> dict[str, Any]:
        """Summary as plain Python values (fractions in [0, 1]) plus the count matrices.

        Keys: ``top1``, ``top5`` (k clipped to the class count; ``k`` holds the value used),
        ``mean_class_acc`` (mean top-1 over classes that have samples), ``n_images``,
        ``per_class`` (list of ``{class_index, n, top1, top5}``; accuracies ``None`` for
        classes without samples), ``confusion`` and ``top5_pairs`` (int64 tensors, copies).
        An empty meter reports 0.0 accuracies.
        """
        n = self.n_images
        present = self.counts > 0
        denom = self.counts.clamp(min=1).double()
        acc1 = self.correct1.double() / denom
        acc5 = self.correct5.double() / denom
        per_class = [
            {
                "class_index": i,
                "n": int(self.counts[i]),
                "top1": float(acc1[i]) if present[i] else None,
                "top5": float(acc5[i]) if present[i] else None,
            }
            for i in range(self.num_classes)
        ]
        return {
            "top1": int(self.correct1.sum()) / n if n else 0.0,
            "top5": int(self.correct5.sum()) / n if n else 0.0,
            "k": self.k,
            "mean_class_acc": float(acc1[present].mean()) if n else 0.0,
            "n_images": n,
            "per_class": per_class,
            "confusion": self.confusion.clone(),
            "top5_pairs": self.top5_pairs.clone(),
        }
