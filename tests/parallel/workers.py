"""Code that runs inside the processes the parallel tests spawn (importable by reference)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

MODEL = "vgg16_deepimage"
WIDTH = 1 / 16
SIZE = 32
CLASSES = 4
GLOBAL_BATCH = 8
STEPS = 3
HYPER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
SEED = 0
CASES = [("ddp", 1), ("butterfly", 1), ("lazy", 1), ("butterfly", 2), ("lazy", 2), ("ddp", 2),
         ("lazy_shm", 1), ("lazy_shm", 2), ("butterfly_shm", 1), ("butterfly_shm", 2)]  # fmt: skip
# "lazy" and "butterfly" over torch.distributed; "lazy_shm" and "butterfly_shm" over shared memory


class WireCounter:
    """Bytes this rank sends, counted where the collectives are issued.

    :meth:`install` wraps ``torch.distributed``'s collectives (and every alias of them that an
    already imported ``deepimage`` module holds) so that each call adds what a ring algorithm
    sends for the tensors it is given: all-reduce ``2 (N - 1) / N`` of the buffer,
    reduce-scatter ``(N - 1) / N`` of the input, all-gather ``(N - 1) / N`` of the output,
    a point-to-point send its tensor.
    Only calls made inside :meth:`counting` are counted.
    """

    def __init__(self) -> None:
        self.bytes = 0.0
        self.calls = 0
        self._active = False

    def _rules(self) -> dict[str, Callable[..., float]]:
        def size(t: torch.Tensor) -> float:
            return float(t.numel() * t.element_size())

        def reduce_scatter(n: int, out: torch.Tensor, inp: torch.Tensor, *a, **k) -> float:
            return (n - 1) / n * size(inp)

        def gather_into(n: int, out: torch.Tensor, inp: torch.Tensor, *a, **k) -> float:
            return (n - 1) / n * size(out)

        return {
            "all_reduce": lambda n, t, *a, **k: 2 * (n - 1) / n * size(t),
            "reduce_scatter_tensor": reduce_scatter,
            "reduce_scatter_single": reduce_scatter,
            "all_gather_into_tensor": gather_into,
            "all_gather_single": gather_into,
            "all_gather": lambda n, outs, t, *a, **k: (n - 1) * size(t),
            "isend": lambda n, t, *a, **k: size(t),  # point to point: the tensor itself
        }

    def install(self) -> None:
        for name, rule in self._rules().items():
            original = getattr(dist, name, None)
            if original is None:  # not in this torch version
                continue

            def counted(*args, _original=original, _rule=rule, **kwargs):
                if not self._active:
                    return _original(*args, **kwargs)
                self.bytes += _rule(dist.get_world_size(), *args, **kwargs)
                self.calls += 1
                self._active = False  # a collective built on another is counted once
                try:
                    return _original(*args, **kwargs)
                finally:
                    self._active = True

            setattr(dist, name, counted)
            for module in list(sys.modules.values()):
                if getattr(module, "__name__", "").startswith("deepimage"):
                    for attr, value in list(vars(module).items()):
                        if value is original:
                            setattr(module, attr, counted)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def take(self) -> float:
        """The bytes counted since the last call."""
        nbytes, self.bytes = self.bytes, 0.0
        return nbytes


def setup(rank: int, world: int, port: int, timeout: float = 60.0) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from deepimage.parallel import dist as pdist

    pdist.init_distributed(torch.device("cpu"), timeout=timeout)


def build_model() -> torch.nn.Module:
    from deepimage.models import get_model

    torch.manual_seed(SEED)
    return get_model(MODEL, num_classes=CLASSES, image_size=SIZE, width=WIDTH)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of a step: images, labels and image keys (rows)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    rows = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
    return x, y, rows


def lr_at(step: int) -> float:
    """A learning rate that changes every step (the deferred lazy test's schedule)."""
    return HYPER["lr"] * (1.0 - 0.15 * step)


def reference_weights(steps: int = STEPS, schedule: bool = False) -> dict[str, torch.Tensor]:
    """One process, the whole batch, torch.optim.SGD (lr :func:`lr_at` with ``schedule``)."""
    from deepimage.train.step import forward_backward

    model = build_model()
    opt = torch.optim.SGD(model.parameters(), **HYPER)
    for step in range(steps):
        if schedule:
            opt.param_groups[0]["lr"] = lr_at(step)
        x, y, rows = batch(step)
        forward_backward(model, x, y, precision="fp32", dropout_key=(rows, SEED, step))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make_strategy(sync: str, model: torch.nn.Module, opt: torch.optim.Optimizer):
    """The strategy of a case; lazy update and butterfly over each of their two transports."""
    from deepimage.parallel.butterfly import Butterfly
    from deepimage.parallel.lazy import LazyUpdate
    from deepimage.parallel.registry import build_strategy

    shared = sync.endswith("_shm")
    if sync.startswith("lazy"):
        return LazyUpdate(model, opt, shared_memory=shared)
    if sync.startswith("butterfly"):
        return Butterfly(model, opt, bucket_mb=0.05, shared_memory=shared)
    return build_strategy(sync, model, opt, bucket_mb=0.05)


def run_strategies(rank: int, world: int, port: int, out: str) -> None:
    """Train each case for STEPS steps on this rank's slice; check ranks agree every step."""
    from deepimage.parallel.base import broadcast_model
    from deepimage.train.step import forward_backward

    wire = WireCounter()
    wire.install()
    setup(rank, world, port)
    report: dict = {}
    for sync, accum in CASES:
        model = build_model()
        broadcast_model(model)
        opt = torch.optim.SGD(model.parameters(), **HYPER)
        strategy = make_strategy(sync, model, opt)
        train_model = strategy.wrap()
        local = GLOBAL_BATCH // world
        lo, hi = rank * local, (rank + 1) * local
        case = f"{sync}-accum{accum}"
        per_step_bytes, per_step_wire, identical, pending_after_backward = [], [], [], []
        launched_before_input_grad = []
        for step in range(STEPS):
            x, y, rows = batch(step)
            strategy.stats.reset()
            wire.take()
            x_local, before, seen = x[lo:hi], wire.calls, []
            if sync == "butterfly":  # collectives issued when backward reaches the input
                x_local = x_local.clone().requires_grad_(True)
                x_local.register_hook(lambda g, seen=seen: seen.append(wire.calls))
            elif sync == "butterfly_shm":  # buckets posted when backward reaches the input
                before = 0
                x_local = x_local.clone().requires_grad_(True)
                x_local.register_hook(lambda g, seen=seen, s=strategy: seen.append(s.launched))
            with wire.counting():
                forward_backward(
                    train_model, x_local, y[lo:hi], accum_steps=accum, precision="fp32",
                    micro_step=strategy.micro_step, dropout_key=(rows[lo:hi], SEED, step),
                )  # fmt: skip
                if sync.startswith("lazy"):
                    pending_after_backward.append(
                        sum(layer.pending is not None for layer in strategy.layers)
                    )
                if seen:  # the last micro-batch's backward, the one that syncs
                    launched_before_input_grad.append(seen[-1] - before)
                strategy.step()
                strategy.zero_grad()
                strategy.flush()  # exact weights, to compare across ranks at every step
            per_step_bytes.append(strategy.stats.bytes_sent)
            per_step_wire.append(wire.take())
            flat = _flat(model)
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            identical.append(all(torch.equal(gathered[0], t) for t in gathered))
        info = {
            "bytes": per_step_bytes,
            "wire": per_step_wire,
            "identical": identical,
            "grad_bytes": sum(p.numel() * 4 for p in model.parameters()),
            "n_layers": len(getattr(strategy, "layers", [])),
            "pending_after_backward": pending_after_backward,
            "launched_before_input_grad": launched_before_input_grad,
            # a direct (point-to-point) reduce-scatter issues one send to every other rank
            "calls_per_bucket": 1
            if getattr(strategy, "shm", None) is not None
            else world - 1
            if getattr(strategy, "direct", False)
            else 1,
        }
        if sync.startswith("butterfly"):
            info["ownership"] = strategy.ownership
            info["momentum_numel"] = [m.numel() for m in strategy.momentum]
            full = strategy.state_dict()  # gathered: must equal a torch.optim.SGD state
            if rank == 0:
                save_file(
                    {str(i): s["momentum_buffer"] for i, s in full["state"].items()},
                    str(Path(out) / f"{case}-momentum.safetensors"),
                )
        report[case] = info
        if rank == 0:
            weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(Path(out) / f"{case}.safetensors"))
        strategy.close()
    (Path(out) / f"report-{rank}.json").write_text(json.dumps(report, default=str))
    dist.destroy_process_group()


DEFERRED_STEPS = 5


def run_deferred(rank: int, world: int, port: int, out: str, sync: str) -> None:
    """A strategy as the training loop drives it: no flush between steps (lazy's updates and
    butterfly's all-gathers land in the next forward pass), the learning rate changing every
    step, one flush at the end."""
    from deepimage.parallel.base import broadcast_model
    from deepimage.train.step import forward_backward

    setup(rank, world, port)
    model = build_model()
    broadcast_model(model)
    opt = torch.optim.SGD(model.parameters(), **HYPER)
    strategy = make_strategy(sync, model, opt)
    local = GLOBAL_BATCH // world
    lo, hi = rank * local, (rank + 1) * local
    in_flight = []
    for step in range(DEFERRED_STEPS):
        opt.param_groups[0]["lr"] = lr_at(step)
        x, y, rows = batch(step)
        forward_backward(
            model, x[lo:hi], y[lo:hi], precision="fp32", micro_step=strategy.micro_step,
            dropout_key=(rows[lo:hi], SEED, step),
        )  # fmt: skip
        strategy.step()
        strategy.zero_grad()
        if sync.startswith("lazy"):
            in_flight.append(sum(layer.pending is not None for layer in strategy.layers))
        else:
            in_flight.append(strategy.gathers_in_flight)
    strategy.flush()
    units = len(strategy.layers) if sync.startswith("lazy") else len(strategy.buckets)
    report = {"in_flight_between_steps": in_flight, "units": units}
    (Path(out) / f"deferred-{sync}-{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(Path(out) / f"{sync}-deferred.safetensors"))
    strategy.close()
    dist.destroy_process_group()


def run_hang(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 never joins the all-reduce: rank 0 must fail within the timeout, naming itself."""
    from deepimage.parallel import dist as pdist

    setup(rank, world, port, timeout=3.0)
    pdist.barrier()
    if rank == 1:
        time.sleep(12)
        return
    start = time.monotonic()
    try:
        pdist.all_reduce_([torch.ones(4)], op="all_reduce(test)")
        message = "no error"
    except pdist.CollectiveError as err:
        message = str(err)
    result = {"message": message, "seconds": time.monotonic() - start}
    (Path(out) / "hang.json").write_text(json.dumps(result))
    # The abandoned all-reduce is still pending in gloo: tearing the process group down
    # normally may abort the process. Leave at once; the result is on disk.
    os._exit(0)


BN_MODEL = "resnet18"
BN_WIDTH = 0.125
BN_CASES = ["ddp", "butterfly", "lazy"]


def build_bn_model() -> torch.nn.Module:
    from deepimage.models import get_model

    torch.manual_seed(SEED)
    return get_model(BN_MODEL, num_classes=CLASSES, image_size=SIZE, width=BN_WIDTH)


def bn_reference_state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One process, plain batch norm, the whole batch, torch.optim.SGD, in ``dtype``."""
    from deepimage.train.step import forward_backward

    model = build_bn_model().to(dtype)
    opt = torch.optim.SGD(model.parameters(), **HYPER)
    for step in range(STEPS):
        x, y, _ = batch(step)
        forward_backward(model, x.to(dtype), y, precision="fp32")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_sync_bn(rank: int, world: int, port: int, out: str) -> None:
    """Train a batch-norm model with synchronised batch norm under each strategy."""
    from deepimage.parallel.base import broadcast_model
    from deepimage.parallel.sync_bn import convert_sync_batchnorm
    from deepimage.train.step import forward_backward

    setup(rank, world, port)
    report: dict = {}
    for sync in BN_CASES:
        model = convert_sync_batchnorm(build_bn_model())
        broadcast_model(model)
        opt = torch.optim.SGD(model.parameters(), **HYPER)
        strategy = make_strategy(sync, model, opt)
        train_model = strategy.wrap()
        local = GLOBAL_BATCH // world
        lo, hi = rank * local, (rank + 1) * local
        identical = []
        for step in range(STEPS):
            x, y, _ = batch(step)
            forward_backward(
                train_model, x[lo:hi], y[lo:hi], precision="fp32", micro_step=strategy.micro_step
            )
            strategy.step()
            strategy.zero_grad()
            strategy.flush()
            flat = torch.cat([t.detach().float().reshape(-1) for t in model.state_dict().values()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            identical.append(all(torch.equal(gathered[0], t) for t in gathered))
        report[sync] = {"identical": identical}
        if rank == 0:
            weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(Path(out) / f"bn-{sync}.safetensors"))
        strategy.close()
    (Path(out) / f"bn-report-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
