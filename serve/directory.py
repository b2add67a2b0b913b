"""The stream directory (one replica, no CPU, off the step path).

``StreamDirectory`` knows who owns each stream, its latest checkpoint (an object in Ray's object
store owned by the directory, so it outlives the replica that wrote it), streams parked by a
replica that shut down, and tombstones of expired streams. It is consulted only when a replica
meets a stream id it does not hold, plus one call per ``checkpoint_every`` steps of a stream.

A replica *claims* a stream id it does not hold (``claim``): the answer says whether the stream is
new, held by a live replica (release it from there), parked (its exact state), lost with its
replica (its last checkpoint) or expired. Claims of one id are serialized. A restarted directory
has a new ``incarnation``; live replicas then re-announce their streams (``register``), and
for ``REGISTER_GRACE_S`` it answers "wait" instead of "new".
"""

import asyncio
import time
import uuid
from collections import OrderedDict
from typing import Optional

import ray

#: A new directory answers "wait" instead of "new/unknown" this long: after a restart, live
#: replicas re-announce the streams they hold within one reaper period (<= 1 s).
REGISTER_GRACE_S = 2.5
#: Tombstones of expired streams kept (oldest dropped first).
MAX_TOMBSTONES = 1_000_000


class _Entry:
    __slots__ = ("owner", "ckpt", "ckpt_steps", "parked")

    def __init__(self, owner: Optional[str]):
        self.owner = owner  # replica id holding the stream, None while parked
        self.ckpt = None  # ObjectRef of the latest checkpoint blob (owned by the directory)
        self.ckpt_steps = 0
        self.parked: Optional[bytes] = None  # exact state left by a replica that shut down


class StreamDirectory:
    """Stream ownership, checkpoints, parked streams and tombstones (see the module docstring)."""

    def __init__(self):
        self.incarnation = uuid.uuid4().hex  # a restarted directory has a new one (and no state)
        self._born = time.monotonic()
        self._entries: dict = {}  # stream id -> _Entry
        self._expired: OrderedDict = OrderedDict()  # stream id -> None
        self._replicas: dict = {}  # replica id -> its actor handle (for liveness)
        self._locks: dict = {}  # stream id -> [asyncio.Lock, users] while claims run

    async def register(self, replica_id: str, actor, sids=()) -> str:
        """A replica announces itself, and the streams it holds (after a directory restart)."""
        self._replicas[replica_id] = actor
        for sid in sids:
            e = self._entries.get(sid)
            if e is None:
                self._entries[sid] = _Entry(replica_id)
            elif e.owner is None or not await self._alive(e.owner):
                e.owner = replica_id
        return self.incarnation

    async def get_incarnation(self) -> str:
        return self.incarnation

    async def deregister(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    async def _alive(self, replica_id: str) -> bool:
        actor = self._replicas.get(replica_id)
        if actor is None:
            return False
        try:
            await asyncio.wait_for(actor.__ray_ready__.remote(), 5.0)
            return True
        except asyncio.TimeoutError:
            return True  # busy, not dead: the claimer retries and gives up at its deadline
        except Exception:  # noqa: BLE001 - RayActorError and kin: the actor is gone
            self._replicas.pop(replica_id, None)
            return False

    async def claim(self, sid: str, me: str, create: bool = True, force: bool = False) -> tuple:
        """Replica ``me`` asks for stream ``sid``; returns what it must do (module docstring)."""
        slot = self._locks.setdefault(sid, [asyncio.Lock(), 0])  # [lock, claims waiting or in]
        slot[1] += 1
        async with slot[0]:
            try:
                e = self._entries.get(sid)
                if e is None:
                    if sid in self._expired:
                        return ("expired",)
                    if time.monotonic() - self._born < REGISTER_GRACE_S:
                        return ("wait",)  # live replicas may not have re-announced their streams
                    if not create:
                        return ("unknown",)
                    self._entries[sid] = _Entry(me)
                    return ("new",)
                if e.parked is not None:
                    blob, e.parked, e.owner = e.parked, None, me
                    return ("parked", blob)
                if (e.owner is not None and e.owner != me and not force
                        and await self._alive(e.owner)):
                    return ("moved", e.owner)
                reason = ("its replica died" if e.owner not in (None, me) else
                          "its replica lost it")
                e.owner = me
                blob = None if e.ckpt is None else await e.ckpt
                return ("checkpoint", blob, reason + (f"; checkpoint at step {e.ckpt_steps}"
                                                      if blob else "; no checkpoint"))
            finally:
                slot[1] -= 1
                if not slot[1]:
                    self._locks.pop(sid, None)

    async def moved(self, sid: str, frm: str, to: str) -> None:
        e = self._entries.get(sid)
        if e is not None and e.owner == frm:
            e.owner = to

    async def checkpoint(self, owner: str, blobs: dict) -> int:
        """Store checkpoints ``{sid: (steps, blob)}`` of streams ``owner`` holds."""
        n = 0
        for sid, (steps, blob) in blobs.items():
            e = self._entries.get(sid)
            if e is not None and e.owner == owner:
                e.ckpt, e.ckpt_steps = ray.put(blob), steps
                n += 1
        return n

    async def park(self, owner: str, blobs: dict) -> None:
        """A replica shutting down leaves its streams' exact states ``{sid: (steps, blob)}``."""
        for sid, (steps, blob) in blobs.items():
            e = self._entries.get(sid)
            if e is not None and e.owner == owner:
                e.parked, e.owner = blob, None
                e.ckpt, e.ckpt_steps = ray.put(blob), steps
        self._replicas.pop(owner, None)

    async def forget(self, sids: list) -> None:
        for sid in sids:
            self._entries.pop(sid, None)
            self._expired.pop(sid, None)

    async def revive(self, sid: str) -> None:
        self._expired.pop(sid, None)

    async def expire(self, owner: str, sids: list) -> None:
        for sid in sids:
            e = self._entries.get(sid)
            if e is not None and e.owner == owner:
                del self._entries[sid]
                self._expired[sid] = None
        while len(self._expired) > MAX_TOMBSTONES:
            self._expired.popitem(last=False)

    async def owner(self, sid: str) -> Optional[str]:
        e = self._entries.get(sid)
        return None if e is None else e.owner

    async def stats(self) -> dict:
        return {"streams": len(self._entries), "expired": len(self._expired),
                "replicas": sorted(self._replicas),
                "checkpoints": sum(e.ckpt is not None for e in self._entries.values()),
                "parked": sum(e.parked is not None for e in self._entries.values())}
