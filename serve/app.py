"""``app()``: the Ray Serve application of a stream service."""

from __future__ import annotations

import hashlib
import math
import os

from ray import serve
from ray.serve.config import RequestRouterConfig

import lstm_cpu
from lstm_cpu.errors import InputError

from .directory import StreamDirectory
from .replica import StreamReplica
from .snapshot import fingerprint

#: Deployment names inside the application.
REPLICA_NAME, DIRECTORY_NAME = "LSTMStreams", "LSTMStreamDirectory"


def _positive(name, v, kind=float, zero=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (kind is int and v != int(v)) or (v < 0 if zero else v <= 0):
        raise InputError(f"{name}: expected a {'non-negative' if zero else 'positive'} "
                         f"{kind.__name__}, got {v!r}")
    return kind(v)


def app(model_path, *, replicas: int = 2, max_batch: int = 64, batch_wait_ms: float = 1.0,
        idle_timeout_s: float = 300.0, checkpoint_every: int = 100, replica_cpus: float = 1.0,
        **load_options):
    """A Ray Serve application serving streams of the model at ``model_path``.

    Args:
        model_path: any file ``lstm_cpu.load`` accepts; it must be readable at this path on
            every node that runs a replica (shared storage, or the same image).
        replicas: stream replicas (each holds the state of the streams routed to it).
        max_batch: at most this many concurrent streams stepped in one round of a replica.
        batch_wait_ms: a round waits at most this long for more streams.
        idle_timeout_s: a stream not stepped for this long is freed; its id then raises
            ``StreamExpired`` until ``end`` is called.
        checkpoint_every: every stream is checkpointed to Ray's object store after every
            N-th step (0: only on demand, ``checkpoint(stream_id)``). After a replica dies, its
            streams continue from there: at most N-1 steps to resend.
        replica_cpus: Ray CPUs reserved per replica (a replica steps on one core).
        **load_options: passed to ``lstm_cpu.load`` (``prefix=``, ``node=``, ``head=``...).

    Returns the application for ``serve.run(app(...))``; the handle ``serve.run`` returns offers
    ``step``, ``end``, ``snapshot``, ``restore``, ``where``, ``checkpoint`` and ``info``.
    """
    replicas = _positive("replicas", replicas, int)
    max_batch = _positive("max_batch", max_batch, int)
    batch_wait_ms = _positive("batch_wait_ms", batch_wait_ms, float, zero=True)
    idle_timeout_s = _positive("idle_timeout_s", idle_timeout_s, float)
    checkpoint_every = _positive("checkpoint_every", checkpoint_every, int, zero=True)
    replica_cpus = _positive("replica_cpus", replica_cpus, float, zero=True)
    model_path = os.path.abspath(os.fspath(model_path))
    model = lstm_cpu.load(model_path, **load_options)  # fail here, not in every replica
    model.stream()  # raises UnsupportedModelError for a model that cannot stream
    settings = {"max_batch": max_batch, "batch_wait_ms": batch_wait_ms,
                "idle_timeout_s": idle_timeout_s, "checkpoint_every": checkpoint_every}
    # Fixed versions: Serve would otherwise give every deployment a random version on each
    # serve.run and restart all replicas, the directory with its checkpoints included. With them,
    # serve.run with another `replicas` only scales, another setting (user_config) only
    # reconfigures, and a new model or lstm-cpu version rolls the replicas (which park their
    # streams for their successors) while the directory stays.
    version = hashlib.sha256(repr((fingerprint(model), model_path, sorted(load_options.items()),
                                   lstm_cpu.__version__)).encode()).hexdigest()[:16]
    directory = _versioned(serve.deployment(
        StreamDirectory, name=DIRECTORY_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000, health_check_period_s=1.0), "directory-1").bind()
    return _versioned(serve.deployment(
        StreamReplica, name=REPLICA_NAME, num_replicas=replicas, user_config=settings,
        ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=100_000,
        health_check_period_s=1.0, health_check_timeout_s=10.0,
        graceful_shutdown_wait_loop_s=0.2, graceful_shutdown_timeout_s=30.0,
        request_router_config=RequestRouterConfig(
            request_router_class="lstm_cpu.serve.router.StreamRouter"),
    ), version).bind(model_path, load_options, directory, settings)


def _versioned(deployment, version: str):
    """``deployment`` with a fixed version. Ray 2.60 removed the public ``version=`` option and
    keeps it for its own callers (``_internal=True``); without it, redeploys restart everything."""
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError):  # pragma: no cover - a Ray without the internal option
        return deployment
