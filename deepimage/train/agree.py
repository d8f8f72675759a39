"""Every rank holds the same data and the same training state, or every rank stops.

Under torchrun each rank opens the data and reads the checkpoint for itself. A rank that
cannot (a node without the shared path) would leave the others waiting in the next
collective until the timeout, and ranks that read different files (the current checkpoint
and its ``.prev``, or nodes that do not share the run folder) would train on and diverge in
silence. The functions here pass each rank's outcome through one collective, so that every
rank stops at once with the same error naming the ranks, hosts and paths concerned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepimage.data.index import DataError
from deepimage.data.store import Store
from deepimage.parallel import dist as pdist
from deepimage.runs import CheckpointError, StoredTensor, flatten_state


def store_digest(store: Store) -> str:
    """What the pixels of a store depend on: classes, labels and the SHA-256 of every shard
    (version 1 stores: the source fingerprint). The same for a copy on another node."""
    h = hashlib.sha256()
    shards = store.manifest.get("shards")
    content = shards if shards else store.fingerprint
    h.update(json.dumps([list(store.classes), store.sizes, store.mode, content]).encode())
    h.update(np.ascontiguousarray(store.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def open_data_everywhere(prepare: Callable[[], Any], source: Any) -> Any:
    """``prepare()`` (the training data of ``source``) on every rank, without a hang when
    one rank cannot.

    Rank 0 prepares first; then the first process of every other node prepares the stores in
    its own cache folder, or finds rank 0's there when the path is shared; then the others
    open them. Every rank then checks that its stores hold what rank 0's hold (labels and
    shard checksums). A rank that fails, or whose stores differ, ends every rank at once with
    one error naming the rank, its host and the path.
    """
    phase = 0 if pdist.rank() == 0 else 1 if pdist.local_rank() == 0 else 2
    data = None
    for turn in range(3):
        failure = None
        if phase == turn:
            try:
                data = prepare()
            except (DataError, ValueError, OSError) as err:
                failure = f"{type(err).__name__}: {err}"
        failed = pdist.failures_everywhere(failure, op="all_gather(prepare data)")
        if failed:
            raise DataError("cannot open the training data on every rank: " + "; ".join(failed))
    assert data is not None
    path = str(data.train_store.path)
    digest = [store_digest(data.train_store), store_digest(data.val_store)]
    digest.append(hashlib.sha256(np.asarray(data.train_rows, np.int64).tobytes()).hexdigest())
    differ = pdist.ranks_differing_from_root(digest, op="all_gather(data digest)", detail=path)
    if differ:
        (root_host, _, root_path), others = differ[0], {r: d for r, d in differ.items() if r}
        named = ", ".join(f"rank {r} on {h} ({p})" for r, (h, _, p) in others.items())
        raise DataError(
            f"the prepared training data of {named} differs from rank 0's on {root_host} "
            f"({root_path}): every node must prepare the same files (--data {source})"
        )
    return data


def _split_state(obj: Any, prefix: str, tensors: dict[str, Any]) -> Any:
    """:func:`flatten_state` that also takes tensors left in their file (hybrid's rows)."""
    if isinstance(obj, StoredTensor):
        tensors[prefix] = obj
        return {"__stored__": prefix}
    if isinstance(obj, dict):
        return {f"{type(k).__name__}:{k}": _split_state(v, f"{prefix}.{k}", tensors)
                for k, v in obj.items()}  # fmt: skip
    if isinstance(obj, list | tuple):
        return [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return flatten_state(obj, prefix, tensors)


def _tensor_bytes(t: torch.Tensor | StoredTensor) -> Any:
    """The bytes of ``t``; a stored tensor row by row, so that no rank ever holds more than
    one row of an FC layer it does not own (hybrid's promise) to check it."""
    if isinstance(t, torch.Tensor):
        yield t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return
    for lo in range(t.shape[0] if t.dim() else 0):
        yield t[lo : lo + 1].reshape(-1).view(torch.uint8).numpy().tobytes()


def state_digest(state: dict[str, Any] | None) -> str | None:
    """SHA-256 of a training state (every tensor's bytes and every other value), or None.

    Tensors left in the checkpoint file (:class:`~deepimage.runs.StoredTensor`, hybrid's FC
    layers) are hashed block by block, so no rank holds a whole FC layer to check it."""
    if state is None:
        return None
    tensors: dict[str, Any] = {}
    skeleton = _split_state(state, "s", tensors)
    h = hashlib.sha256(json.dumps(skeleton, sort_keys=True).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        for chunk in _tensor_bytes(tensors[key]):
            h.update(chunk)
    return h.hexdigest()


def check_same_state(state: dict[str, Any] | None, run: Path) -> None:
    """Raise :class:`CheckpointError` on every rank, naming the ranks, when ranks loaded
    different training states from ``run`` (or some none)."""
    differ = pdist.ranks_differing_from_root(
        state_digest(state), op="all_gather(checkpoint digest)"
    )
    if not differ:
        return

    def what(digest: str | None) -> str:
        return "no checkpoint" if digest is None else f"state {digest[:12]}"

    (root_host, root, _), others = differ[0], {r: d for r, d in differ.items() if r}
    named = ", ".join(f"rank {r} on {h} ({what(d)})" for r, (h, d, _) in others.items())
    raise CheckpointError(
        f"{run}: {named} loaded another training state than rank 0 on {root_host} "
        f"({what(root)}); every rank must see the same run folder"
    )
