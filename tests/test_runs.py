import json
import os

import pytest
import torch

from deepimage.files import atomic_write_text
from deepimage.runs import (
    CheckpointError,
    load_latest_state,
    load_state,
    save_state,
)


def test_state_round_trip_keeps_types(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "pair": (1, "a"),
        "nested": {"x": None, "y": [1.5, True]},
    }
    save_state(tmp_path / "c.safetensors", state)
    back = load_state(tmp_path / "c.safetensors")
    assert back["pair"] == (1, "a") and back["nested"] == {"x": None, "y": [1.5, True]}
    assert torch.equal(back["rng"], state["rng"])
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf)


def test_previous_checkpoint_is_kept_and_used_when_the_latest_is_corrupt(tmp_path):
    save_state(tmp_path / "checkpoint.safetensors", {"step": 1})
    save_state(tmp_path / "checkpoint.safetensors", {"step": 2})
    assert (tmp_path / "checkpoint.safetensors.prev").exists()
    assert load_latest_state(tmp_path)["step"] == 2
    data = (tmp_path / "checkpoint.safetensors").read_bytes()
    (tmp_path / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    assert load_latest_state(tmp_path)["step"] == 1


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad"])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="checkpoint.safetensors") as info:
        load_state(path)
    assert "\n" not in str(info.value)


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError):
        load_state(path)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_write_json_list_streams_a_json_array(tmp_path):
    from deepimage.files import atomic_write_json_list

    items = ["a", 'quote " and é', {"k": [1, 2]}, None]
    atomic_write_json_list(tmp_path / "l.json", iter(items))
    atomic_write_json_list(tmp_path / "empty.json", [])
    assert json.loads((tmp_path / "l.json").read_text(encoding="utf-8")) == items
    assert json.loads((tmp_path / "empty.json").read_text()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "l.json"]


def test_run_folder_knows_when_it_holds_a_run_and_names_a_damaged_file(tmp_path):
    from deepimage.runs import Run

    run = Run(tmp_path / "r")
    assert not run.started() and run.read_json("finetune.json") is None
    run.save_state({"step": 1})
    assert run.started() and run.latest_state()["step"] == 1
    run.write_json("finetune.json", {"trainable": "head"})
    assert run.read_json("finetune.json") == {"trainable": "head"}
    run.finetune_report.write_text('{"trainable": ')  # cut short
    with pytest.raises(CheckpointError, match="finetune.json") as info:
        run.read_json("finetune.json")
    assert "\n" not in str(info.value)


class _Rows:
    """A chunked tensor: the rows of ``full`` in blocks, as hybrid ranks stream them."""

    def __init__(self, full: torch.Tensor, block: int) -> None:
        self.full, self.block = full, block
        self.shape, self.dtype = full.shape, full.dtype

    def chunks(self):
        for lo in range(0, self.shape[0], self.block):
            yield self.full[lo : lo + self.block].clone()


def test_a_streamed_state_reads_back_whole_or_row_by_row(tmp_path):
    """Chunked tensors streamed into the file equal the whole tensors; loaded lazily, a row
    range is read alone from the file (a tensor of its own size)."""
    from deepimage.runs import StoredTensor, state_key

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 3, generator=gen)
    state = {
        "model": {"fc.weight": _Rows(weight, 4), "fc.bias": torch.arange(10.0)},
        "optimizer": {"state": {3: {"momentum_buffer": _Rows(weight.to(torch.bfloat16), 3)}}},
        "flags": torch.tensor([True, False]),
        "step": 7,
    }
    save_state(tmp_path / "c.safetensors", state)
    back = load_state(tmp_path / "c.safetensors")
    assert torch.equal(back["model"]["fc.weight"], weight) and back["step"] == 7
    assert torch.equal(back["optimizer"]["state"][3]["momentum_buffer"], weight.bfloat16())
    assert torch.equal(back["flags"], state["flags"])
    lazy = {state_key("model", "fc.weight"), state_key("optimizer", "state", 3, "momentum_buffer")}
    stored = load_state(tmp_path / "c.safetensors", lambda k: k in lazy)
    rows = stored["model"]["fc.weight"]
    assert isinstance(rows, StoredTensor) and rows.shape == (10, 3)
    part = rows[4:7]
    assert torch.equal(part, weight[4:7]) and part.untyped_storage().nbytes() == 3 * 3 * 4
    momentum = stored["optimizer"]["state"][3]["momentum_buffer"][8:10]
    assert torch.equal(momentum, weight[8:10].bfloat16())
    assert torch.equal(stored["model"]["fc.bias"], torch.arange(10.0))


def test_a_process_that_does_not_write_only_streams(tmp_path):
    """``write=False`` (the other ranks): every chunked tensor is iterated, nothing written."""
    seen = []

    class Counting(_Rows):
        def chunks(self):
            for chunk in super().chunks():
                seen.append(len(chunk))
                yield chunk

    save_state(tmp_path / "c.safetensors", {"w": Counting(torch.ones(5, 2), 2)}, write=False)
    assert seen == [2, 2, 1] and not (tmp_path / "c.safetensors").exists()
