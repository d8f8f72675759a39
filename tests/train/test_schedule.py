import pytest

from deepimage.config import resolve_config
from deepimage.train.schedule import LRSchedule


def schedule(steps_per_epoch=10, **values):
    return LRSchedule(resolve_config(None, values), steps_per_epoch)


def test_plateau_divides_by_ten_after_patience():
    s = schedule(schedule="plateau", patience=1)
    for epoch, acc in enumerate([0.5, 0.6, 0.6]):
        s.end_epoch(epoch, acc)
    assert s.lr_at(3, 0) == pytest.approx(0.01)  # one bad epoch: within patience
    s.end_epoch(3, 0.55)
    assert s.lr_at(4, 0) == pytest.approx(0.001)
    s.end_epoch(4, 0.7)  # improvement resets the count
    s.end_epoch(5, 0.7)
    assert s.lr_at(6, 0) == pytest.approx(0.001)


def test_plateau_state_round_trips():
    a = schedule(patience=0)
    a.end_epoch(0, 0.5)
    a.end_epoch(1, 0.4)
    b = schedule(patience=0)
    b.load_state_dict(a.state_dict())
    assert b.lr_at(2, 0) == a.lr_at(2, 0) == pytest.approx(0.001)


def test_step_exp_and_warmup():
    s = schedule(schedule="step", milestones=[2, 4])
    assert [s.lr_at(e, 0) for e in (0, 2, 4)] == pytest.approx([0.01, 0.001, 0.0001])
    e = schedule(schedule="exp", gamma=0.5)
    assert e.lr_at(3, 5) == pytest.approx(0.01 / 8)
    w = schedule(schedule="constant", warmup_epochs=1.0)
    assert w.lr_at(0, 0) == pytest.approx(0.001)
    assert w.lr_at(0, 9) == pytest.approx(0.01)
    assert w.lr_at(1, 0) == pytest.approx(0.01)
