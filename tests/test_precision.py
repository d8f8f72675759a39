"""precision: auto picks bf16 only where the hardware runs it fast; fp16 keeps its scaler."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deepimage import precision as P
from deepimage.config import resolve_config
from deepimage.runs import CHECKPOINT, load_state, save_state
from deepimage.train.loop import train
from tests.helpers import write_flat_folder

CPU = torch.device("cpu")
ZEN3 = P.CpuInfo("AMD EPYC 7B13", frozenset({"avx2", "fma", "sse4_2"}))
SKYLAKE = P.CpuInfo("Intel Xeon Gold 6148", frozenset({"avx2", "avx512f", "avx512bw"}))
COOPER = P.CpuInfo("Intel Xeon 8380H", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE = P.CpuInfo("Intel Xeon 8480", frozenset({"avx512f", "amx_bf16", "amx_tile"}))
GRAVITON3 = P.CpuInfo("Neoverse-V1", frozenset({"fp", "asimd", "sve", "bf16"}))


def never() -> dict[str, float]:
    raise AssertionError("the probe must not run here")


@pytest.mark.parametrize("cpu", [ZEN3, SKYLAKE])
def test_a_cpu_without_native_bf16_trains_in_fp32_without_probing(cpu):
    choice = P.choose("auto", "auto", CPU, cpu=cpu, probe=never)
    assert (choice.precision, choice.channels_last) == ("fp32", False)
    assert "no native bf16" in choice.reason


@pytest.mark.parametrize("cpu", [COOPER, SAPPHIRE, GRAVITON3])
def test_native_bf16_and_a_faster_probe_choose_bf16_channels_last(cpu):
    choice = P.choose("auto", "auto", CPU, cpu=cpu, probe=lambda: {"fp32": 1.0, "bf16": 0.4})
    assert (choice.precision, choice.channels_last) == ("bf16", True)
    assert "2.50x faster" in choice.reason


@pytest.mark.parametrize("bf16", [1.2, 0.97])  # slower, or within the noise margin
def test_native_bf16_but_no_measured_gain_keeps_fp32(bf16):
    choice = P.choose("auto", "auto", CPU, cpu=COOPER, probe=lambda: {"fp32": 1.0, "bf16": bf16})
    assert (choice.precision, choice.channels_last) == ("fp32", False)


def test_a_forced_precision_or_layout_is_kept_and_never_probed():
    choice = P.choose("bf16", "auto", CPU, cpu=ZEN3, probe=never)
    assert (choice.precision, choice.channels_last, choice.reason) == ("bf16", True, "as requested")
    choice = P.choose("fp32", True, CPU, cpu=COOPER, probe=never)
    assert (choice.precision, choice.channels_last) == ("fp32", True)
    assert P.choose("auto", False, CPU, cpu=ZEN3).channels_last is False


def test_cuda_uses_bf16_where_native_else_fp16_with_a_scaler_else_fp32():
    cuda = torch.device("cuda")
    assert P.choose("auto", "auto", cuda, cuda_bf16=True).precision == "bf16"
    fp16 = P.choose("auto", "auto", cuda, cuda_bf16=False)
    assert (fp16.precision, fp16.channels_last) == ("fp16", True)
    assert P.needs_grad_scaler(fp16.precision) and not P.needs_grad_scaler("bf16")
    assert P.choose("auto", "auto", cuda, cuda_bf16=False, fp16_ok=False).precision == "fp32"


def test_cpuinfo_flags_are_read_for_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f "
                   "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9R14\n")  # fmt: skip
    info = P.cpu_info(x86)
    assert info.model == "AMD EPYC 9R14" and info.native_bf16
    assert info.reported_flags() == ["avx2", "avx512f", "avx512_bf16"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\nCPU part\t: 0xd40\n")
    assert not P.cpu_info(arm).native_bf16
    assert P.cpu_info(tmp_path / "missing").flags == frozenset()


def tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.5),
        torch.nn.Linear(4, 3),
    )  # fmt: skip


def test_the_probe_leaves_the_model_and_the_global_rng_alone():
    torch.manual_seed(3)
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    times = P.measure_step_times(net, 12, batch_size=4, repeats=1)
    assert set(times) == {"fp32", "bf16"} and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


@pytest.fixture
def probe_calls(monkeypatch):
    """The input sizes the (faked) probe measured, in order."""
    calls = []

    def fake_measure(model, size, **kwargs):
        calls.append(size)
        return {"fp32": 1.0, "bf16": 0.5}

    monkeypatch.setattr(P, "measure_step_times", fake_measure)
    for var in P.ISA_LIMITS:
        monkeypatch.delenv(var, raising=False)
    return calls


def test_the_probe_runs_once_per_model_and_input_size(tmp_path, probe_calls):
    net = tiny_net()
    for size in (16, 16, 24):
        assert P.cached_probe(net, "tiny", size, tmp_path)() == {"fp32": 1.0, "bf16": 0.5}
    P.cached_probe(net, "other", 16, tmp_path)()
    assert probe_calls == [16, 24, 16]
    assert len(json.loads((tmp_path / "precision-probe.json").read_text())) == 3


def test_an_instruction_set_cap_gets_its_own_probe(tmp_path, monkeypatch, probe_calls):
    # ONEDNN_MAX_CPU_ISA=AVX2 runs bf16 emulated on a CPU whose flags say native bf16
    P.cached_probe(tiny_net(), "tiny", 16, tmp_path)()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    P.cached_probe(tiny_net(), "tiny", 16, tmp_path)()
    assert probe_calls == [16, 16]


# --- through training -------------------------------------------------------------------


def config(tmp_path, out, **extra):
    data = write_flat_folder(tmp_path / "d", {"a": 8, "b": 8, "c": 8})
    values = dict(data=str(data), out=str(tmp_path / out), cache_dir=str(tmp_path / "cache"),
                  model="vgg16_deepimage", width=0.0625, size=40, crop=32, epochs=1,
                  batch_size=4, workers=0, progress=False, tensorboard=False, lr=0.05,
                  augment="crop_flip", checkpoint_every=1)  # fmt: skip
    return resolve_config(None, {**values, **extra})


def test_auto_is_resolved_and_recorded_in_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "cpu_info", lambda path="/proc/cpuinfo": ZEN3)
    summary = train(config(tmp_path, "run", max_steps=1))
    assert summary["execution"]["precision"] == "fp32"
    assert "no native bf16" in summary["execution"]["reason"]
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.startswith("# precision fp32 (contiguous): this CPU has no native bf16")
    saved = yaml.safe_load(text)
    assert (saved["precision"], saved["channels_last"]) == ("fp32", False)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["precision"] == "fp32"


def test_fp16_scaler_state_is_checkpointed_and_resume_is_exact(tmp_path):
    straight = train(config(tmp_path, "straight", precision="fp16", max_steps=4))
    assert straight["execution"]["precision"] == "fp16"
    train(config(tmp_path, "split", precision="fp16", max_steps=2))
    state = load_state(tmp_path / "split" / CHECKPOINT)
    assert state["grad_scaler"]["scale"] > 0 and "_growth_tracker" in state["grad_scaler"]
    # a scale that differs from the one a fresh scaler starts with must come back on resume
    state["grad_scaler"]["scale"] = 1024.0
    save_state(tmp_path / "split" / CHECKPOINT, state, keep_previous=False)
    train(config(tmp_path, "split", precision="fp16", max_steps=3), resume=True)
    resumed = load_state(tmp_path / "split" / CHECKPOINT)
    assert resumed["grad_scaler"]["scale"] == 1024.0  # growth_interval 2000: no growth yet
    train(config(tmp_path, "again", precision="fp16", max_steps=2))
    train(config(tmp_path, "again", precision="fp16", max_steps=4), resume=True)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_resume_without_scaler_state_is_a_clear_error(tmp_path):
    from deepimage.runs import CheckpointError

    train(config(tmp_path, "run", precision="fp16", max_steps=1))
    state = load_state(tmp_path / "run" / CHECKPOINT)
    del state["grad_scaler"]
    save_state(tmp_path / "run" / CHECKPOINT, state, keep_previous=False)
    with pytest.raises(CheckpointError, match="gradient-scaler"):
        train(config(tmp_path, "run", precision="fp16", max_steps=2), resume=True)


def test_the_probe_alternates_the_sides_and_keeps_each_sides_fastest_step(monkeypatch):
    # A slow spell (other work on the machine) over three consecutive timed steps must
    # not decide the choice: alternating spreads it over both sides, and the minimum drops it.
    calls = []
    timed = iter([0.10, 0.05, 0.50, 0.45, 0.50, 0.05])  # fp32, bf16, fp32, bf16, ...

    def fake_step(net, x, labels, precision, train):
        calls.append(precision)
        return 0.0 if len(calls) <= 4 else next(timed)  # 1 bf16 budget check + 3 warm-ups

    monkeypatch.setattr(P, "_time_step", fake_step)
    times = P.measure_step_times(tiny_net(), 12, batch_size=2, repeats=3)
    assert calls[4:] == ["fp32", "bf16"] * 3
    assert times == {"fp32": 0.10, "bf16": 0.05}


def test_an_emulated_bf16_warm_up_over_budget_ends_the_probe(monkeypatch):
    calls = []

    def fake_step(net, x, labels, precision, train):
        calls.append(precision)
        return 9.0 if precision == "bf16" else 0.1

    monkeypatch.setattr(P, "_time_step", fake_step)
    times = P.measure_step_times(tiny_net(), 12, batch_size=2, budget_s=8.0)
    assert calls == ["bf16", "fp32"] and times["bf16"] >= 8.0 > times["fp32"]
