"""Sticky routing: a consistent hash ring of the live replicas, keyed by stream id.

:class:`StreamRouter` is a Ray Serve ``RequestRouter``: every handle (the driver's, the HTTP
ingress's, a replica's own) builds one, and all of them map a stream id to the same replica
because the ring is a pure function of the replica set. When a replica comes or goes, only the
streams on its arcs move (~1/n of them), and the replicas hand those over (see ``replica``).
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Iterable, Optional
from urllib.parse import parse_qs, unquote

from ray.serve.request_router import RequestRouter

#: Points per replica on the ring: more points, a more even share (64: within ~15% at n=2..8).
VNODES = 64


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing of string keys onto a set of node names."""

    def __init__(self, nodes: Iterable[str], vnodes: int = VNODES):
        ring = sorted((_point(f"{n}#{v}"), n) for n in set(nodes) for v in range(vnodes))
        self._points = [p for p, _ in ring]
        self._nodes = [n for _, n in ring]

    def node(self, key: str) -> Optional[str]:
        if not self._points:
            return None
        i = bisect.bisect(self._points, _point(key)) % len(self._points)
        return self._nodes[i]


def stream_key(args, kwargs) -> Optional[str]:
    """The stream id of a handle call ``method(stream_id, ...)`` or of an HTTP/WebSocket request
    from Serve's proxy (``/streams/{id}/...``, ``/streams/ws?stream_id=``), or None."""
    sid = kwargs.get("stream_id", args[0] if args else None)
    if isinstance(sid, str):
        return sid
    # The proxy's request object carries its ASGI scope; a private attribute, so anything
    # unexpected just means "any replica" (the replica then claims the stream: still correct).
    scope = getattr(sid, "_asgi_scope", None)
    if not isinstance(scope, dict):
        return None
    parts = str(scope.get("path", "")).split("/")
    try:
        i = parts.index("streams")
    except ValueError:
        return None
    if i + 1 >= len(parts):
        return None
    if parts[i + 1] == "ws" and i + 2 == len(parts):
        q = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        return q.get("stream_id", [None])[0]
    return unquote(parts[i + 1]) or None


class StreamRouter(RequestRouter):
    """Routes a call to the replica owning its stream id on the ring.

    A call with ``_to=<replica id>`` (a replica asking another for a stream) goes to that replica
    if this router sees it, else anywhere: the receiver answers ``NotHere`` and the caller asks
    the directory again. Calls without a stream id go to any replica.
    """

    _ring_ids: tuple = ()  # the sorted replica ids the ring was built from
    _ring = HashRing(())

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        args, kwargs = pending_request.args, pending_request.kwargs
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        to = kwargs.get("_to")
        if isinstance(to, str):
            return [[by_id[to]]] if to in by_id else [candidate_replicas]
        sid = stream_key(args, kwargs)
        if sid is None:
            return [candidate_replicas]
        ids = tuple(sorted(by_id))
        if ids != self._ring_ids:
            self._ring_ids, self._ring = ids, HashRing(ids)
        return [[by_id[self._ring.node(sid)]]]
