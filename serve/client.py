"""``StreamClient``: one stream seen from a client, with replay after a replica failure."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import numpy as np
import ray
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                  ReplicaUnavailableError)

from .errors import StreamLost

#: Errors after which a step is retried: the call may not have reached a replica (dead, not yet
#: replaced, not yet known to the router). A retried step carries the same ``seq``, so a step
#: applied twice is impossible: the service answers StreamLost instead.
TRANSIENT = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
             ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


def _transient(e: BaseException) -> bool:
    return isinstance(e, TRANSIENT) or isinstance(getattr(e, "cause", None), TRANSIENT)


class StreamClient:
    """Steps one stream through a handle, keeping the inputs since its last checkpoint.

    Every step sends ``seq`` (the steps answered so far), so the service can never silently
    reset or skip the stream. When a replica died and the stream came back from a checkpoint
    ``k`` steps in, the service raises ``StreamLost(resume_from=k)``; the client resends its
    inputs from step k (their outputs are discarded: they are the ones it already returned),
    adds the count to :attr:`replayed` and carries on. If it no longer has those inputs (more
    than ``keep`` steps back), ``StreamLost`` reaches the caller.

    Args:
        handle: the application's handle (from ``serve.run``) or its stream deployment's.
        stream_id: the stream's id.
        keep: inputs kept for replay; ``checkpoint_every`` of the app suffices (``info()``).
        retry_s: how long transient Ray errors (replica died, being replaced) are retried.
    """

    def __init__(self, handle, stream_id: str, keep: int, retry_s: float = 60.0):
        self.handle, self.stream_id = handle, stream_id
        self.steps = 0  # steps answered
        self.replayed = 0  # steps resent after failures, in total
        self.retries = 0  # calls retried after transient errors
        self._inputs: deque = deque(maxlen=max(1, int(keep)))  # inputs of the last steps
        self.retry_s = retry_s

    async def _call(self, x, seq: int):
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                return await self.handle.step.remote(self.stream_id, x, seq=seq)
            except Exception as e:  # noqa: BLE001
                if not _transient(e) or time.monotonic() > deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def step(self, x) -> np.ndarray:
        """x (I,) -> y (out,), exactly as a local stream would answer."""
        while True:
            try:
                y = await self._call(x, self.steps)
                break
            except StreamLost as e:
                await self._replay(e)
        self._inputs.append(x)
        self.steps += 1
        return y

    async def _replay(self, lost: StreamLost) -> None:
        while True:
            k = lost.resume_from
            first = self.steps - len(self._inputs)  # step index of the oldest input kept
            if not first <= k <= self.steps:
                raise lost
            try:
                for i in range(k, self.steps):
                    await self._call(self._inputs[i - first], i)
            except StreamLost as again:
                lost = again
                continue
            self.replayed += self.steps - k
            return

    async def end(self) -> bool:
        return await self.handle.end.remote(self.stream_id)
