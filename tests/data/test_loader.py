import numpy as np

from deepimage.data.loader import epoch_order, eval_batches, stratified_split, train_batches


def test_epoch_order_depends_only_on_seed_and_epoch():
    rows = np.arange(50)
    a = epoch_order(rows, 1, 3)
    assert np.array_equal(a, epoch_order(rows, 1, 3))
    assert not np.array_equal(a, epoch_order(rows, 1, 4))
    assert sorted(a.tolist()) == list(range(50))


def test_train_batches_drop_the_incomplete_one():
    batches = train_batches(np.arange(10), 4, 0, 0)
    assert [len(b) for b in batches] == [4, 4]
    assert len(set(np.concatenate(batches).tolist())) == 8


def test_eval_batches_cover_every_row_once():
    batches = eval_batches(np.arange(10), 4)
    assert np.array_equal(np.concatenate(batches), np.arange(10))


def test_stratified_split_keeps_every_class_and_is_deterministic():
    labels = np.repeat(np.arange(4), [10, 20, 2, 1])
    train, val = stratified_split(labels, 0.2, seed=5)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert [int((labels[val] == c).sum()) for c in range(4)] == [2, 4, 1, 0]
    t2, v2 = stratified_split(labels, 0.2, seed=5)
    assert np.array_equal(val, v2) and np.array_equal(train, t2)
