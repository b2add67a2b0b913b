"""Stepping the concurrent streams of one replica together, bit-identically to stepping each alone.

Requests wait at most ``wait_s`` after the first of a round arrives (or until ``max_batch`` are
queued); the round's streams are then stepped in groups through ``model.stream(batch=k)``:
each group's state is loaded from its streams, stepped once, and copied back. A group stays below
the threshold from which the batched stream switches to numpy's BLAS (whose summation order
differs from the fused kernel's by ~1e-8): below it, one stream's result is bit-identical to
the same stream stepped alone, whatever else is in the batch. The threshold is read from the
engine here, in one place, so a change of policy splits the groups accordingly.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Optional

import numpy as np

#: Largest group stepped through one batched stream. Any group gives each stream its lone bits
#: (the fused kernels; batches of 40+ took BLAS products until 2026-11-27, hence the 39): the cap
#: only bounds one call's latency.
GROUP_MAX = 39


class StreamRecord:
    """One stream's state on its replica: h (L, out), c (L, H), steps taken, last use."""

    __slots__ = ("sid", "h", "c", "steps", "last", "pending")

    def __init__(self, sid: str, h: np.ndarray, c: np.ndarray, steps: int = 0):
        self.sid = sid
        self.h, self.c, self.steps = h, c, int(steps)  # (L, out), (L, H)
        self.last = time.monotonic()
        self.pending: Optional[asyncio.Future] = None  # the stream's queued or running step

    async def idle(self) -> None:
        """Wait until no step of this stream is queued or running."""
        while self.pending is not None and not self.pending.done():
            await asyncio.wait([self.pending])


class StepBatcher:
    """Collects ``submit(rec, x)`` calls and steps them in rounds.

    Args:
        model: the replica's LSTMModel (forward, unidirectional).
        max_batch: at most this many streams per round.
        wait_s: a round waits at most this long after its first request for more.
        before_round: optional ``async f(records)`` awaited before a round's steps (the replica
            checkpoints there: a state whose outputs the client has all received, since it
            asked for the next step).
    """

    def __init__(self, model, max_batch: int = 64, wait_s: float = 0.001, before_round=None,
                 group_max: int = GROUP_MAX):
        self.model, self.max_batch, self.wait_s = model, int(max_batch), float(wait_s)
        self.group_max = max(1, min(int(group_max), GROUP_MAX))
        self.before_round = before_round
        self._queue: deque = deque()  # (record, x (I,), future)
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._single = model.stream(kernel="serial")
        self._batched = {}  # k -> model.stream(batch=k): one scratch buffer per group size
        self.rounds = 0
        self.stepped = 0

    def submit(self, rec: StreamRecord, x: np.ndarray) -> asyncio.Future:
        """Queue a step of ``rec``: x (I,) of the model's dtype; the future gives y (out,)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        fut = loop.create_future()
        rec.pending = fut
        rec.last = time.monotonic()
        self._queue.append((rec, x, fut))
        self._wake.set()
        return fut

    def close(self):
        if self._task is not None:
            self._task.cancel()

    async def _run(self):
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            deadline = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, later, seen = [], deque(), set()
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if id(item[0]) in seen:  # a stream's second step waits for the next round
                    later.append(item)
                else:
                    seen.add(id(item[0]))
                    batch.append(item)
            self._queue.extendleft(reversed(later))
            try:
                if self.before_round is not None:
                    await self.before_round([r for r, _, _ in batch])
                ys = await asyncio.to_thread(self._step_round, [(r, x) for r, x, _ in batch])
            except Exception as e:  # noqa: BLE001 - delivered to every caller of the round
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.rounds += 1
            self.stepped += len(batch)
            for (_, _, fut), y in zip(batch, ys):
                if not fut.done():
                    fut.set_result(y)

    def _step_round(self, items) -> list:
        """Step every (record, x) once; returns the outputs, each (out,). In a worker thread."""
        ys = []
        for g in range(0, len(items), self.group_max):
            ys.extend(self.step_group(items[g : g + self.group_max]))
        return ys

    def step_group(self, items) -> list:
        """Step up to ``group_max`` streams together: load states, one batched step, copy back."""
        k = len(items)
        if k == 1:
            rec, x = items[0]
            s = self._single
            s.state = (rec.h, rec.c)
            y = s.step(x)  # (out,)
            rec.h, rec.c = s.state
            rec.steps += 1
            return [y]
        s = self._batched.get(k)
        if s is None:
            s = self._batched[k] = self.model.stream(batch=k, kernel="serial")
        s.state = (np.stack([r.h for r, _ in items], axis=1),  # (L, k, out)
                   np.stack([r.c for r, _ in items], axis=1))  # (L, k, H)
        Y = s.step(np.stack([x for _, x in items]))  # (k, I) -> (k, out)
        h, c = s.state  # (L, k, out), (L, k, H) copies
        for j, (rec, _) in enumerate(items):
            rec.h, rec.c = h[:, j].copy(), c[:, j].copy()
            rec.steps += 1
        return list(Y)
