"""The training state's digest, which ranks compare after loading a checkpoint."""

import torch

from deepimage.runs import StoredTensor, load_state, save_state
from deepimage.train import agree


def _stored(path, fc_weight):
    save_state(path, {"model": {"fc.weight": fc_weight, "fc.bias": torch.zeros(4)}, "step": 3})
    return load_state(path, lambda key: key.endswith("fc.weight"))


def test_a_state_with_rows_left_in_the_file_has_a_digest_that_sees_every_row(tmp_path):
    weight = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    a = _stored(tmp_path / "a.safetensors", weight)
    b = _stored(tmp_path / "b.safetensors", weight.clone())
    changed = weight.clone()
    changed[9, 3] += 1  # the last row: a digest of the first block alone would miss it
    c = _stored(tmp_path / "c.safetensors", changed)
    assert isinstance(a["model"]["fc.weight"], StoredTensor)
    assert agree.state_digest(a) == agree.state_digest(b) != agree.state_digest(c)


def test_a_stored_tensor_is_hashed_row_by_row(tmp_path):
    state = _stored(tmp_path / "a.safetensors", torch.randn(10, 4))
    stored = state["model"]["fc.weight"]
    blocks = list(agree._tensor_bytes(stored))  # never more than one row of 4 floats
    assert [len(b) for b in blocks] == [16] * 10
    assert b"".join(blocks) == stored[0:10].numpy().tobytes()
