"""The training input pipeline: augmentation in loader workers, the device decode path and the
device cache of encoded bytes. Batches depend on (seed, epoch, rows) alone, never on where
they are decoded and augmented or by how many workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepimage.augment.pipeline import build_train_augment
from deepimage.data.index import scan_folder
from deepimage.data.loader import (
    DeviceCache,
    decode_batches,
    input_path,
    iterate_batches,
    rank_rows,
    train_batches,
)
from deepimage.data.prepare import prepare_store
from tests.helpers import write_photo_folder

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def jpeg_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = write_photo_folder(root / "photos", {"a": 7, "b": 6, "c": 5})
    index = scan_folder(data)
    return prepare_store(index, root / "store", [40], workers=0, progress=False,
                         encoding="jpeg", shard_bytes=20_000)  # fmt: skip


def augment_of(store):
    return build_train_augment("deepimage", size=40, crop=32, seed=3, mean=MEAN, std=STD,
                               stats=store.stats)  # fmt: skip


def test_worker_augmented_batches_are_bitwise_equal_for_any_worker_count(jpeg_store):
    augment = augment_of(jpeg_store)
    batches = train_batches(np.arange(len(jpeg_store)), 5, seed=3, epoch=2)
    runs = {
        w: list(iterate_batches(jpeg_store.path, 40, batches, w, transform=augment.for_epoch(2)))
        for w in (0, 2)
    }
    plain = list(iterate_batches(jpeg_store.path, 40, batches))
    for (x0, l0, r0), (x2, l2, r2), (images, labels, rows) in zip(*runs.values(), plain):
        assert x0.shape == (5, 3, 32, 32) and x0.dtype == torch.float32
        assert torch.equal(x0, x2) and torch.equal(l0, l2) and torch.equal(r0, r2)
        # what the training process did before: augment the decoded batch itself
        assert torch.equal(x0, augment(images, rows.numpy(), 2))
        assert torch.equal(l0, labels)
        assert not torch.equal(x0, augment(images, rows.numpy(), 3))  # the epoch is used


def test_the_input_path_follows_the_device_and_the_encoding():
    assert input_path("cpu", "jpeg", cached=False) == "worker-augment"
    assert input_path("cpu", "raw", cached=False) == "worker-augment"
    assert input_path("cuda", "jpeg", cached=False) == "device-decode"
    assert input_path("cuda:1", "raw", cached=False) == "worker-decode"
    assert input_path("cuda", "jpeg", cached=True) == "cache"
    assert input_path("cpu", "jpeg", cached=True) == "cache"


def test_workers_hand_over_the_stored_jpeg_bytes_for_a_device_decoder(jpeg_store):
    from deepimage.data.decode import decode_jpeg

    rows = np.array([9, 2, 14])
    blobs, labels, got = next(iterate_batches(jpeg_store.path, 40, [rows], encoded=True))
    assert got.tolist() == rows.tolist() and labels.tolist() == jpeg_store.labels[rows].tolist()
    decoded = np.stack([decode_jpeg(b.numpy().tobytes()) for b in blobs])
    assert np.array_equal(decoded, jpeg_store.read(40, rows))


def test_the_device_cache_holds_the_encoded_bytes_and_gives_the_store_batches(jpeg_store):
    rows = np.arange(len(jpeg_store))
    cache = DeviceCache(jpeg_store.path, 40, rows, torch.device("cpu"))
    stored = int(jpeg_store.stored_lengths(40, rows).sum())
    assert cache.encoded and cache.data.numel() == stored < len(rows) * 40 * 40 * 3
    assert DeviceCache.nbytes(jpeg_store, 40, rows) == stored
    batches = train_batches(rows, 4, seed=1, epoch=5)
    for (a, la, ra), (b, lb, rb) in zip(
        iterate_batches(jpeg_store.path, 40, batches), cache.iterate(batches), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ra, rb)


def test_a_rank_caches_only_its_share_where_the_order_allows(jpeg_store):
    rows = np.arange(len(jpeg_store))
    batch, world = 6, 2
    shares = [rank_rows(rows, batch, 7, [0], r * 3, (r + 1) * 3) for r in range(world)]
    assert len(np.intersect1d(*shares)) == 0  # one epoch: the ranks' shares are disjoint
    assert len(shares[0]) == len(shares[1]) == len(rows) // batch * batch // world
    assert np.array_equal(rank_rows(rows, batch, 7, range(50), 0, 3), rows)  # then all
    cache = DeviceCache(jpeg_store.path, 40, shares[1], torch.device("cpu"))
    slices = [b[3:6] for b in train_batches(rows, batch, 7, 0)]
    assert len(list(cache.iterate(slices))) == len(slices)
    with pytest.raises(ValueError, match=f"row {shares[0][0]} is not held"):
        list(cache.iterate([shares[0][:2]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device path needs CUDA")
def test_the_device_path_decodes_and_augments_on_the_gpu(jpeg_store):
    device = torch.device("cuda")
    rows = np.arange(len(jpeg_store))
    batches = train_batches(rows, 4, seed=1, epoch=0)
    blobs = iterate_batches(jpeg_store.path, 40, batches, 2, pin_memory=True, encoded=True)
    on_gpu = list(decode_batches(blobs, device))
    cache = DeviceCache(jpeg_store.path, 40, rows, device)
    augment = augment_of(jpeg_store)
    for (images, labels, got), (cached, _, _), batch in zip(
        on_gpu, cache.iterate(batches), batches, strict=True
    ):
        assert images.device.type == "cuda" and images.shape == (4, 40, 40, 3)
        assert labels.tolist() == jpeg_store.labels[batch].tolist()
        cpu = torch.from_numpy(jpeg_store.read(40, batch))
        diff = (images.cpu().int() - cpu.int()).abs()  # nvjpeg's IDCT rounds differently
        assert float(diff.float().mean()) < 1.0 and int(diff.max()) <= 8
        assert torch.equal(images, cached)  # the cache decodes with the same decoder
        x = augment(images, got.numpy(), 0)
        assert x.device.type == "cuda" and x.shape == (4, 3, 32, 32)


@pytest.fixture
def shared_allocations(monkeypatch):
    """A counter of the shared-memory buffers that forked loader workers allocate."""
    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("counts allocations in forked workers")
    count = torch.zeros(1, dtype=torch.int64).share_memory_()
    new_shared = torch.UntypedStorage._new_shared

    def counting(nbytes, *args, **kwargs):
        count.add_(1)
        return new_shared(nbytes, *args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", staticmethod(counting))
    return count


@pytest.mark.parametrize("augmented", [True, False])
def test_workers_reuse_batch_memory_only_once_it_is_let_go(
    jpeg_store, shared_allocations, augmented
):
    augment = augment_of(jpeg_store)
    transform = augment.for_epoch(1) if augmented else None
    rows = np.arange(len(jpeg_store))
    batches = [b for e in range(6) for b in train_batches(rows, 4, seed=0, epoch=e)]
    expected = [
        x for x, _, _ in iterate_batches(jpeg_store.path, 40, batches, 0, transform=transform)
    ]
    kept = []
    for i, (x, _, _) in enumerate(
        iterate_batches(jpeg_store.path, 40, batches, 1, transform=transform)
    ):
        assert torch.equal(x, expected[i])
        if i in (0, 13):
            kept.append((i, x[1:3], x.numpy()[3]))  # a view and an array keep the memory
    assert int(shared_allocations) < len(batches) // 2  # the buffers were reused
    for i, view, array in kept:
        assert torch.equal(view, expected[i][1:3]) and np.array_equal(array, expected[i][3])
    every = list(iterate_batches(jpeg_store.path, 40, batches, 2, transform=transform))
    assert all(torch.equal(x, e) for (x, _, _), e in zip(every, expected, strict=True))
