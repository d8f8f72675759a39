"""Gradient exchange through shared memory, for the processes of one machine on CPU.

Over gloo, an all-reduce between two processes of one host moves every byte through loopback
TCP: a copy into the kernel, a copy out, and the sum, on the cores that also compute. Here
every local rank maps one shared file instead (``/dev/shm``), and the exchange of a gradient
is the paper's butterfly without a wire:

* each rank writes its gradient into its own slot and raises its *posted* counter;
* rank k sums part k of every rank's slot, in rank order, into the shared result, divides by
  N, and raises its *reduced* counter (the reduce-scatter);
* every rank reads the whole mean from the result (the broadcast back costs nothing); a
  ``finish`` callback may first turn rank k's part into something else (butterfly leaves the
  updated weights of part k there).

Per rank that is ``(N-1)/N`` of the gradient read from the others and ``1/N`` written: no
copies beyond the one into the slot, no system calls on the data path. Counters only grow
(one per exchange), so a slot is never rewritten before every rank has reduced it: a rank
writes exchange ``s + 1`` only after it has consumed the result of ``s``, which needs every
rank's reduction of ``s``.

The counters are plain aligned 8-byte stores and loads ordered by x86-64's memory model (stores
are seen in program order, loads are not reordered with loads), so :meth:`ShmExchange.create`
offers it only there, only when every rank is on the same host (boot id and host name) and the
communication device is the CPU; otherwise callers keep torch.distributed's collectives.
``DEEPIMAGE_SHM=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from deepimage.parallel import dist as pdist

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_POLL_S = 2e-5  # a waiting rank yields the core between polls, first for 20 us,
_POLL_MAX_S = 5e-4  # doubling up to 0.5 ms (many ranks on few cores: leave them the CPU)
_CHECK_PEERS_S = 0.2  # and looks for dead peers this often


def _machine_id() -> str:
    """Host name and boot id: equal on two processes only when they share a kernel."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{pdist.host()}/{boot}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def shm_supported() -> str | None:
    """Why this process cannot use shared-memory exchange, or None if it can."""
    if os.environ.get("DEEPIMAGE_SHM", "1") == "0":
        return "DEEPIMAGE_SHM=0"
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
    if not SHM_DIR.is_dir():
        return f"{SHM_DIR} missing"
    if pdist.comm_device().type != "cpu":
        return "the communication device is not the CPU"
    return None


class ShmExchange:
    """Mean of equally sized float32 gradients over the local ranks, one exchange per index.

    ``sizes[i]`` is the number of elements of exchange ``i`` (for example one layer's
    gradient). :meth:`slot` is where this rank writes exchange ``i``; :meth:`post` announces
    it; :meth:`progress` does this rank's share of any exchange whose inputs are all there,
    without waiting; :meth:`result` waits for exchange ``i`` and returns the mean (a view into
    shared memory, valid until this rank posts ``i`` again).
    """

    def __init__(
        self,
        path: Path,
        sizes: Sequence[int],
        rank: int,
        world: int,
        timeout_s: float,
        pids: Sequence[int] = (),
    ) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.pids = list(pids)  # every rank's process, to notice a peer that died
        self.sizes = [int(n) for n in sizes]
        self.offsets, total = [], 0
        for n in self.sizes:
            self.offsets.append(total)
            total += n
        self.total = total
        count = len(self.sizes)
        floats = (world + 1) * total
        data = torch.from_file(str(path), shared=True, size=floats, dtype=torch.float32)
        self._slots = data[: world * total].view(world, total)
        self._result = data[world * total :]
        counters = torch.from_file(
            str(path) + ".seq", shared=True, size=2 * count * world, dtype=torch.int64
        )
        self._posted, self._reduced = counters.view(2, count, world)
        self.seq = [0] * count  # exchanges of index i this rank has posted
        self._done = [0] * count  # the last exchange of i whose part this rank reduced
        self._open: list[int] = []  # posted, not yet reduced by this rank, in post order
        self._finish: list[Callable[[torch.Tensor], None] | None] = [None] * count

    @staticmethod
    def nbytes(sizes: Sequence[int], world: int) -> int:
        return 4 * (world + 1) * sum(int(n) for n in sizes) + 16 * len(sizes) * world

    @classmethod
    def for_strategy(
        cls, sizes: Sequence[int], shared_memory: bool | None, who: str
    ) -> ShmExchange | None:
        """A strategy's choice: None lets :meth:`create` decide, False keeps
        torch.distributed, True requires shared memory (``who`` names the strategy in the
        error). Collective where it creates: every rank must call it alike."""
        if pdist.world_size() <= 1 or shared_memory is False:
            return None
        exchange = cls.create(sizes)
        if exchange is None and shared_memory:
            raise RuntimeError(f"{who}: shared-memory exchange is not available here")
        return exchange

    @classmethod
    def create(cls, sizes: Sequence[int]) -> ShmExchange | None:
        """One exchange shared by every rank of the job, or None (on every rank alike) where
        shared memory cannot serve it. Collective: every rank must call it."""
        world, rank = pdist.world_size(), pdist.rank()
        if world <= 1:
            return None
        reason = shm_supported()
        ranks = pdist.all_gather_object((_machine_id(), os.getpid()), op="all_gather(shm)")
        pids = [pid for _, pid in ranks]
        if reason is None and len({host for host, _ in ranks}) > 1:
            reason = "the ranks are on more than one host"
        if reason is None and not all(process_alive(pid) for pid in pids):
            reason = "the ranks do not see each other's processes"
        reasons = pdist.all_gather_object(reason, op="all_gather(shm support)")
        if any(reasons):
            if rank == 0:
                why = next(r for r in reasons if r)
                logger.info("gradient exchange through torch.distributed: %s", why)
            return None
        name = None
        if rank == 0:
            name = cls._make_files(sizes, world)
            if name is None:
                logger.info(
                    "gradient exchange through torch.distributed: %s lacks %.0f MB free",
                    SHM_DIR, 2 * cls.nbytes(sizes, world) / 1e6,
                )  # fmt: skip
        name = pdist.broadcast_object(name, op="broadcast(shm name)")
        failure = None
        exchange = None
        if name is None:
            failure = "rank 0 could not create the shared file"
        else:
            try:
                exchange = cls(SHM_DIR / name, sizes, rank, world, pdist.timeout_s(), pids)
            except (OSError, RuntimeError) as err:
                failure = str(err).splitlines()[0]
        failures = pdist.all_gather_object(failure, op="all_gather(shm open)")
        if rank == 0 and name is not None:  # every rank has mapped it (or failed): unlink now
            for suffix in ("", ".seq"):
                (SHM_DIR / (name + suffix)).unlink(missing_ok=True)
        return None if any(failures) else exchange

    @staticmethod
    def _make_files(sizes: Sequence[int], world: int) -> str | None:
        need = ShmExchange.nbytes(sizes, world)
        name = f"deepimage-{uuid.uuid4().hex}"
        try:
            stat = os.statvfs(SHM_DIR)
            if stat.f_bavail * stat.f_frsize < 2 * need:  # leave room for everything else
                return None
            floats = 4 * (world + 1) * sum(int(n) for n in sizes)
            for suffix, size in (("", floats), (".seq", need - floats)):
                with open(SHM_DIR / (name + suffix), "wb") as f:
                    f.truncate(size)
            return name
        except OSError:
            for suffix in ("", ".seq"):  # leave nothing behind
                (SHM_DIR / (name + suffix)).unlink(missing_ok=True)
            return None

    # ---------------------------------------------------------------------------------------

    def slot(self, i: int) -> torch.Tensor:
        """This rank's input buffer of exchange ``i``."""
        lo = self.offsets[i]
        return self._slots[self.rank, lo : lo + self.sizes[i]]

    def post(self, i: int, finish: Callable[[torch.Tensor], None] | None = None) -> None:
        """Announce that :meth:`slot` ``i`` holds this rank's next gradient.

        ``finish``, if given, is called with this rank's part of the mean once it is
        computed, before the other ranks may read it, and may overwrite it: butterfly turns
        the mean gradient of its part into the updated weights of its part there."""
        self.seq[i] += 1
        self._finish[i] = finish
        self._posted[i, self.rank] = self.seq[i]
        self._open.append(i)

    def part(self, i: int, rank: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of exchange ``i`` that ``rank`` (this one by default) reduces:
        the N parts of ``sizes[i] * r // N`` to ``sizes[i] * (r + 1) // N``."""
        r = self.rank if rank is None else rank
        n = self.sizes[i]
        return r * n // self.world, (r + 1) * n // self.world

    def _reduce(self, i: int) -> None:
        start, stop = self.part(i)
        lo, hi = self.offsets[i] + start, self.offsets[i] + stop
        out = self._result[lo:hi]
        if hi > lo:
            torch.add(self._slots[0, lo:hi], self._slots[1, lo:hi], out=out)
            for r in range(2, self.world):
                out.add_(self._slots[r, lo:hi])
            out.div_(self.world)
        finish, self._finish[i] = self._finish[i], None
        if finish is not None:
            finish(out)
        self._done[i] = self.seq[i]
        self._reduced[i, self.rank] = self.seq[i]
        self._open.remove(i)

    def _all_at_least(self, counters: torch.Tensor, i: int) -> bool:
        return bool((counters[i] >= self.seq[i]).all())

    def progress(self) -> None:
        """Reduce this rank's part of every open exchange whose inputs have all arrived."""
        for i in list(self._open):
            if self._all_at_least(self._posted, i):
                self._reduce(i)

    def result(self, i: int, op: str = "shared-memory exchange") -> torch.Tensor:
        """The mean over the ranks of exchange ``i``, each part as its reducer's ``finish``
        left it (waits for the other ranks)."""
        if self.seq[i] == 0:
            raise RuntimeError(f"{op}: exchange {i} was never posted")
        # progress() reduces this rank's part once every rank has posted
        self._wait(lambda: self._done[i] >= self.seq[i], op, "posted")
        self._wait(lambda: self._all_at_least(self._reduced, i), op, "reduced")
        lo = self.offsets[i]
        return self._result[lo : lo + self.sizes[i]]

    def _wait(self, ready: Callable[[], bool], op: str, what: str) -> None:
        start = check = None
        pause = _POLL_S
        while True:
            self.progress()  # this rank's share of every exchange that is ready
            if ready():
                return
            now = time.monotonic()
            if start is None:
                start = check = now
            elif now - check > _CHECK_PEERS_S:
                check = now
                self._check_peers(op, now - start, what)
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MAX_S)

    def _check_peers(self, op: str, waited: float, what: str) -> None:
        """Fail as a lost collective does: naming this rank, the operation and the cause."""
        dead = [r for r, pid in enumerate(self.pids) if r != self.rank and not process_alive(pid)]
        cause = None
        if dead:
            cause = f"rank {dead[0]} (pid {self.pids[dead[0]]}) exited"
        elif waited > self.timeout_s:
            cause = f"not every rank {what} its part (ranks diverged or stopped)"
        if cause:
            raise pdist.CollectiveError(
                f"rank {self.rank} of {self.world}: collective '{op}' failed after "
                f"{waited:.1f}s (timeout {self.timeout_s:g}s): {cause}"
            )
