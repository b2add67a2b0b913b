"""Stateful stream serving on Ray Serve: ``pip install "lstm-cpu[serve]"``.

    from ray import serve
    from lstm_cpu.serve import app
    handle = serve.run(app("model.lstm", replicas=2))
    y = handle.step.remote("caller-17", x).result()      # x (I,) -> y (out,)

Semantics follow Triton's sequence batcher (a sequence id routes every request of a stream to the
instance holding its state; an idle timeout frees abandoned state; concurrent sequences are
batched into one model call), except that a stream's state is never lost silently: it migrates
when a replica leaves on purpose, comes back from a checkpoint when one dies (the client is told
the step to resend from), and an id whose state is gone raises instead of starting over.

Design decisions
----------------
Routing: Ray Serve's request router API (``ray.serve.request_router.RequestRouter``, a public
alpha API; written and tested against Ray 2.60). :class:`~lstm_cpu.serve.router.StreamRouter`
hashes the stream id onto a consistent hash ring of the live replicas (64 points each), so every
handle in every process sends a stream to the same replica without asking anyone, and a replica
joining or leaving moves only ~1/n of the streams. A router deployment or per-replica named
actors would add a hop or a lookup to every step; the ring needs neither.

Ownership: routing is a hint, the directory is the truth. Routers see replica changes at slightly
different times, so a request can reach a replica that does not hold its stream. That replica
*claims* the stream from a one-replica directory deployment (who owns what, the latest
checkpoints, streams parked by a replica that shut down, tombstones of expired streams) and gets
its exact state from the live owner (a call routed to it by ``_to=<replica id>``), from the
parking lot, or from the last checkpoint when the owner is dead. The directory is off the step
path: one call when a stream starts or moves, one per ``checkpoint_every`` steps.

Checkpoints live in Ray's object store, put there by the directory actor, which owns them: an
object owned by the replica that wrote it would die with that replica. (``ray.put(_owner=)``,
which would avoid the copy through the directory, is gone since Ray 2.56.) A replica awaits the
directory's acknowledgement before answering the step that completed a checkpoint, so a client
never needs more than the last ``checkpoint_every`` inputs to replay.

Replay is the client's: the service does not keep inputs (that would double every step's
traffic), so after a replica death the stream comes back at checkpoint step ``k`` and the client
gets ``StreamLost(resume_from=k)``. :class:`~lstm_cpu.serve.client.StreamClient` keeps the inputs
since the last checkpoint, replays them and counts them in ``replayed``. Every step may carry
``seq`` (the client's step count); a mismatch raises ``StreamLost`` rather than return a value
computed from a different state. The directory itself is a single replica: if it dies, Serve
replaces it, the live replicas re-announce the streams they hold (it answers "wait" to claims
until they had the time), and its checkpoints are gone until the next ones: a stream whose
replica dies in that interval raises ``StreamLost(resume_from=0)``.

Batching: :mod:`~lstm_cpu.serve.batcher` steps the concurrent streams of a replica together in
groups below the engine's BLAS threshold, where the batched kernel is bit-identical to a single
stream.
"""

from __future__ import annotations

from .app import app
from .client import StreamClient
from .errors import (ModelMismatch, SnapshotError, StreamError, StreamExpired, StreamLost,
                     StreamNotFound)

__all__ = ["app", "StreamClient", "StreamError", "StreamLost", "StreamExpired", "StreamNotFound",
           "SnapshotError", "ModelMismatch"]
