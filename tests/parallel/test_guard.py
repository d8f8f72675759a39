"""The guard around collectives: a lost peer becomes one CollectiveError naming rank and op."""

import pytest

from deepimage.parallel import dist as pdist

GLOO_LOST_PEER = (
    "Got the following error when running the callback: RuntimeError: [../gloo/transport/"
    "tcp/pair.cc:545] Read error [127.0.0.1]:40581: Connection reset by peer."
)


@pytest.fixture
def distributed(monkeypatch):
    monkeypatch.setattr(pdist, "is_distributed", lambda: True)
    monkeypatch.setattr(pdist, "rank", lambda: 1)
    monkeypatch.setattr(pdist, "world_size", lambda: 2)


def test_a_lost_peer_inside_backward_is_named_as_a_collective_error(distributed):
    lost = pytest.raises(pdist.CollectiveError, match=r"rank 1 of 2: collective 'backward'")
    with lost, pdist.guard("backward", backend_errors_only=True):
        raise RuntimeError(GLOO_LOST_PEER)


def test_the_models_own_errors_inside_backward_pass_through(distributed):
    own = pytest.raises(RuntimeError, match="mat1 and mat2 shapes")
    with own as info, pdist.guard("backward", backend_errors_only=True):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    assert not isinstance(info.value, pdist.CollectiveError)


def test_backend_errors_are_told_apart_from_computation_errors():
    assert pdist.is_backend_error(RuntimeError(GLOO_LOST_PEER))
    assert pdist.is_backend_error(RuntimeError("NCCL error: unhandled system error"))
    assert not pdist.is_backend_error(RuntimeError("CUDA out of memory"))
