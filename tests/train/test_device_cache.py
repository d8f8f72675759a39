"""The device data cache changes where batches come from, never what they hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepimage.config import resolve_config
from deepimage.data.cache import store_for
from deepimage.data.index import scan_folder
from deepimage.data.loader import DeviceCache, iterate_batches, train_batches
from deepimage.data.prepare import prepare_store
from deepimage.train.loop import Trainer, train
from tests.helpers import write_flat_folder

pytestmark = pytest.mark.slow  # trains twice for a bitwise comparison


def config(data, out, cache, **extra):
    values = dict(data=str(data), out=str(out), cache_dir=str(cache), model="vgg16_deepimage",
                  width=0.0625, size=40, crop=32, epochs=2, batch_size=4, workers=0,
                  progress=False, tensorboard=False, precision="fp32")  # fmt: skip
    return resolve_config(None, {**values, **extra})


def test_batches_from_the_cache_equal_the_store_batches(tmp_path):
    data = write_flat_folder(tmp_path / "d", {"a": 6, "b": 5})
    store = store_for(data, [40], cache_dir=tmp_path / "c", progress=False)
    rows = np.arange(len(store))
    batches = train_batches(rows, 3, seed=1, epoch=2)
    cache = DeviceCache(store.path, 40, rows, torch.device("cpu"))
    for (a, la, ra), (b, lb, rb) in zip(
        iterate_batches(store.path, 40, batches), cache.iterate(batches), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ra, rb)


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_training_with_the_cache_gives_identical_weights(tmp_path, encoding):
    folder = write_flat_folder(tmp_path / "d", {"a": 8, "b": 8, "c": 8})
    data = prepare_store(scan_folder(folder), tmp_path / "store", [40], workers=0,
                         progress=False, encoding=encoding).path  # fmt: skip
    plain = train(config(data, tmp_path / "plain", tmp_path / "c"))
    cached_cfg = config(data, tmp_path / "cached", tmp_path / "c", device_cache_mb=1.0)
    trainer = Trainer(cached_cfg)
    assert trainer.device_cache is not None and trainer.device_cache.encoded == (encoding == "jpeg")
    cached = train(cached_cfg)
    assert plain["val_top1"] == cached["val_top1"]
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_set_over_budget_is_read_from_the_store(tmp_path):
    data = write_flat_folder(tmp_path / "d", {"a": 8, "b": 8})
    cfg = config(data, tmp_path / "r", tmp_path / "c", device_cache_mb=0.001)
    assert Trainer(cfg).device_cache is None
