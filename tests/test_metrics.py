import pytest
import torch

from deepimage.metrics import ClassificationMeter, topk_correct


def _onehot_logits(ranks: list[list[int]], num_classes: int) -> torch.Tensor:
    """Logits whose descending order starts with the given class indices."""
    logits = torch.zeros(len(ranks), num_classes)
    for row, order in enumerate(ranks):
        for pos, cls in enumerate(order):
            logits[row, cls] = float(len(order) - pos)
    return logits


def test_topk_correct_hand_computed():
    # 6 classes; rows list classes from best to worse
    logits = _onehot_logits([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [5, 4, 3, 2, 1], [1, 2, 3, 4, 0]], 6)
    targets = torch.tensor([0, 0, 0, 5])
    hits = topk_correct(logits, targets, ks=(1, 2, 5))
    assert hits[1].tolist() == [True, False, False, False]
    assert hits[2].tolist() == [True, True, False, False]
    assert hits[5].tolist() == [True, True, False, False]
    assert hits[1].dtype == torch.bool


def test_topk_clipped_to_num_classes():
    logits = torch.tensor([[0.1, 0.5, 0.2], [3.0, 2.0, 1.0]])
    targets = torch.tensor([0, 2])
    hits = topk_correct(logits, targets)
    assert hits[1].tolist() == [False, False]
    assert hits[5].tolist() == [True, True]  # top-5 of 3 classes is top-3: always right


def test_ties_prefer_lower_class_index():
    logits = torch.zeros(2, 4)  # all tied
    hits = topk_correct(logits, torch.tensor([0, 1]), ks=(1,))
    assert hits[1].tolist() == [True, False]
    meter = ClassificationMeter(4)
    meter.update(logits, torch.tensor([3, 3]))
    assert meter.confusion[3].tolist() == [2, 0, 0, 0]


def test_meter_hand_computed_results():
    c = 7
    meter = ClassificationMeter(c)
    # batch 1
    meter.update(
        _onehot_logits([[0, 1, 2, 3, 4], [2, 0, 1, 3, 4], [1, 2, 3, 4, 5]], c),
        torch.tensor([0, 0, 1]),
    )
    # batch 2: class 2 wrong in top-1 but right in top-5; class 3 totally wrong
    meter.update(
        _onehot_logits([[1, 2, 3, 4, 5], [0, 1, 2, 4, 5]], c),
        torch.tensor([2, 3]),
    )
    r = meter.results()
    assert r["n_images"] == 5
    assert r["k"] == 5
    assert r["top1"] == pytest.approx(2 / 5)  # rows 0 and 2 right
    assert r["top5"] == pytest.approx(4 / 5)  # all but the class-3 image
    # per-class top-1: class0 1/2, class1 1/1, class2 0/1, class3 0/1; classes 4-6 absent
    assert r["mean_class_acc"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)
    pc = r["per_class"]
    assert [p["n"] for p in pc] == [2, 1, 1, 1, 0, 0, 0]
    assert pc[0] == {"class_index": 0, "n": 2, "top1": 0.5, "top5": 1.0}
    assert pc[2]["top1"] == 0.0 and pc[2]["top5"] == 1.0
    assert pc[3]["top5"] == 0.0
    assert pc[5]["top1"] is None and pc[5]["top5"] is None

    conf = r["confusion"]
    assert conf.dtype == torch.int64 and conf.shape == (c, c)
    expected = torch.zeros(c, c, dtype=torch.int64)
    expected[0, 0] = 1
    expected[0, 2] = 1
    expected[1, 1] = 1
    expected[2, 1] = 1
    expected[3, 0] = 1
    assert torch.equal(conf, expected)

    pairs = r["top5_pairs"]
    assert int(pairs.sum()) == 5 * 5
    assert pairs[0].tolist() == [2, 2, 2, 2, 2, 0, 0]
    assert pairs[3].tolist() == [1, 1, 1, 0, 1, 1, 0]
    assert torch.equal(pairs.diagonal(), meter.correct5)


def test_small_problem_top5_always_right_and_pairs_use_clipped_k():
    meter = ClassificationMeter(3)
    meter.update(torch.tensor([[0.0, 1.0, 2.0], [5.0, 1.0, 0.0]]), torch.tensor([0, 1]))
    r = meter.results()
    assert r["k"] == 3
    assert r["top1"] == 0.0
    assert r["top5"] == 1.0
    assert r["top5_pairs"].sum() == 2 * 3
    assert r["top5_pairs"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]


def test_empty_meter():
    r = ClassificationMeter(4).results()
    assert r["n_images"] == 0
    assert r["top1"] == 0.0 and r["top5"] == 0.0 and r["mean_class_acc"] == 0.0
    assert all(p["top1"] is None for p in r["per_class"])


def _random_batches(num_classes: int, n_batches: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        b = int(torch.randint(1, 9, (1,), generator=g))
        yield (
            torch.randn(b, num_classes, generator=g),
            torch.randint(0, num_classes, (b,), generator=g),
        )


def _equal_state(a: ClassificationMeter, b: ClassificationMeter) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_tensors(), b.state_tensors()))


def test_merge_equals_single_meter():
    batches = list(_random_batches(10, 12, seed=1))
    whole = ClassificationMeter(10)
    left, right = ClassificationMeter(10), ClassificationMeter(10)
    for i, (x, y) in enumerate(batches):
        whole.update(x, y)
        (left if i % 2 else right).update(x, y)
    left.merge(right)
    assert _equal_state(left, whole)
    assert left.results()["top1"] == whole.results()["top1"]

    # summing the state tensors (what all_reduce does) gives the same answer
    a, b = ClassificationMeter(10), ClassificationMeter(10)
    for i, (x, y) in enumerate(batches):
        (a if i < 5 else b).update(x, y)
    summed = [x + y for x, y in zip(a.state_tensors(), b.state_tensors())]
    c = ClassificationMeter(10)
    c.load_state_tensors(summed)
    assert _equal_state(c, whole)


def test_state_round_trip_for_checkpoint(tmp_path):
    batches = list(_random_batches(6, 8, seed=2))
    full = ClassificationMeter(6)
    partial = ClassificationMeter(6)
    for x, y in batches:
        full.update(x, y)
    for x, y in batches[:3]:
        partial.update(x, y)
    state = [t.clone() for t in partial.state_tensors()]
    assert [t.dtype for t in state] == [torch.int64] * 5
    assert [tuple(t.shape) for t in state] == [(6,), (6,), (6,), (6, 6), (6, 6)]
    torch.save(state, tmp_path / "meter.pt")

    resumed = ClassificationMeter(6)
    resumed.load_state_tensors(torch.load(tmp_path / "meter.pt"))
    for x, y in batches[3:]:
        resumed.update(x, y)
    assert _equal_state(resumed, full)
    assert resumed.results()["per_class"] == full.results()["per_class"]

    with pytest.raises(ValueError):
        resumed.load_state_tensors(state[:4])
    with pytest.raises(ValueError):
        ClassificationMeter(5).load_state_tensors(state)


def test_reset_and_bad_inputs():
    meter = ClassificationMeter(4)
    meter.update(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    meter.reset()
    assert meter.n_images == 0
    with pytest.raises(ValueError):
        meter.update(torch.randn(2, 5), torch.tensor([0, 1]))  # wrong class count
    with pytest.raises(ValueError):
        meter.update(torch.randn(2, 4), torch.tensor([0, 4]))  # target out of range
    with pytest.raises(ValueError):
        meter.update(torch.randn(2, 4), torch.tensor([0]))  # length mismatch
    with pytest.raises(ValueError):
        meter.merge(ClassificationMeter(3))
    meter.update(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))  # empty batch is fine
    assert meter.n_images == 0
