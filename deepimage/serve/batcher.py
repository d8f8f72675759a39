"""Micro-batching: concurrent requests share one forward pass, within a bounded wait.

Requests put their decoded image on an asyncio queue and await a future. One worker task
takes the first waiting image, then gathers more until ``max_batch`` images or ``max_wait``
seconds have passed, runs the model once in a thread (so the event loop keeps accepting
and decoding), and resolves every future with its row of posteriors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepimage.serve.predict import Predictor

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What the batcher did: forward passes, images, and the largest batch seen."""

    forwards: int = 0
    images: int = 0
    largest: int = 0

    def as_dict(self) -> dict[str, Any]:
        mean = self.images / self.forwards if self.forwards else 0.0
        return {
            "forwards": self.forwards,
            "images": self.images,
            "largest_batch": self.largest,
            "mean_batch": round(mean, 3),
        }


@dataclass
class MicroBatcher:
    """Collects images from concurrent requests into batches for :class:`Predictor`."""

    predictor: Predictor
    max_batch: int = 16
    max_wait: float = 0.005
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max batch must be positive, got {self.max_batch}")
        if self.max_wait < 0:
            raise ValueError(f"max wait must not be negative, got {self.max_wait}")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        if self._queue is not None:
            await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def submit(self, image: tuple[np.ndarray, ...]) -> np.ndarray:
        """Posteriors for one decoded image (a view tuple from ``Predictor.load_image``)."""
        if self._queue is None or self._task is None:
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def _collect(self) -> list[tuple[tuple[np.ndarray, ...], asyncio.Future]]:
        assert self._queue is not None
        items = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return items

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            items = await self._collect()
            live = [(im, fut) for im, fut in items if not fut.cancelled()]
            try:
                if live:
                    batch = self.predictor.stack([im for im, _ in live])
                    probs = await asyncio.to_thread(self.predictor.probabilities, batch)
                    self.stats.forwards += 1
                    self.stats.images += len(live)
                    self.stats.largest = max(self.stats.largest, len(live))
                    for (_, fut), row in zip(live, probs):
                        if not fut.done():
                            fut.set_result(row)
            except Exception as err:  # a failed forward fails its requests, not the server
                logger.exception("forward pass failed")
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(err)
            finally:
                for _ in items:
                    self._queue.task_done()
