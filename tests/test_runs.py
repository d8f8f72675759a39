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
