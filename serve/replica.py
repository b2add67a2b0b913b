"""The stream replica: the application's entry, holding and stepping its streams.

``StreamReplica`` (``replicas`` of them, routed by :class:`~lstm_cpu.serve.router.StreamRouter`)
    The application's entry: the handle methods (``step``, ``end``, ``snapshot``, ``restore``,
    ``where``, ``checkpoint``, ``info``) and the FastAPI routes (HTTP steps by stream id, a
    WebSocket carrying one stream per connection) are its own, so a handle call or an HTTP step
    reaches the stream's replica in one hop (the router reads the stream id from the call's first
    argument, or from the URL of an HTTP request). Loads the model once, holds the state of its
    streams and steps concurrent streams together (:class:`~lstm_cpu.serve.batcher.StepBatcher`).
    A stream id it does not hold is *claimed* from the directory:

    - unknown: a new stream at the model's initial state;
    - held by a live replica (the ring moved: a replica joined, or a router's view was stale):
      that replica releases it with its exact state (a call routed to it by ``_to``);
    - parked by a replica that shut down on purpose (scale-down, redeploy): the exact state;
    - held by a dead replica: its last checkpoint, and the client gets ``StreamLost`` with the
      step to resend from, unless the ``seq`` it sent is exactly that step;
    - expired: ``StreamExpired``.
"""

import asyncio
import json
import logging
import time
import uuid
from typing import Optional

import numpy as np
import ray
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from ray import serve

import lstm_cpu
from lstm_cpu.errors import InputError, InputTypeError, LSTMError

from .batcher import StepBatcher, StreamRecord
from .errors import (NotHere, SnapshotError, StreamError, StreamExpired, StreamLost,
                     StreamNotFound)
from .snapshot import fingerprint, pack, unpack

log = logging.getLogger("ray.serve")

#: Longest stream id accepted (ids are routing keys and dictionary keys).
MAX_ID_LEN = 256
#: How long a replica keeps trying to take over a stream whose owner is alive but unreachable
#: (e.g. shutting down and about to park it) before it treats the owner as gone.
CLAIM_DEADLINE_S = 30.0
#: How long a round waits for the directory to take its checkpoints before stepping anyway.
CHECKPOINT_TIMEOUT_S = 2.0
#: How long a replica shutting down waits for the directory to take its streams' states.
PARK_TIMEOUT_S = 10.0


def check_stream_id(stream_id) -> str:
    if not isinstance(stream_id, str):
        raise InputTypeError(f"stream_id: expected a str, got {type(stream_id).__name__}")
    if not 0 < len(stream_id) <= MAX_ID_LEN:
        raise InputError(f"stream_id: expected 1 to {MAX_ID_LEN} characters, got {len(stream_id)}")
    return stream_id


def _cause(e: BaseException) -> BaseException:
    """The user exception inside a Ray wrapper (Ray also makes the wrapper an instance of it)."""
    return getattr(e, "cause", None) or e


def _is(e: BaseException, cls) -> bool:
    return isinstance(e, cls) or isinstance(_cause(e), cls)


# ================================================================================================
# HTTP and WebSocket errors
# ================================================================================================
api = FastAPI(title="lstm-cpu streams")


def _error_body(e: BaseException) -> tuple:
    """(HTTP status, JSON body) for an error of a stream call."""
    c = _cause(e)
    body = {"error": type(c).__name__ if isinstance(c, LSTMError) else "ServiceError",
            "message": str(c).splitlines()[0][:1000] if str(c) else type(c).__name__}
    if isinstance(c, StreamLost):
        return 409, dict(body, error="StreamLost", resume_from=c.resume_from)
    if isinstance(c, StreamExpired):
        return 410, dict(body, error="StreamExpired")
    if isinstance(c, StreamNotFound):
        return 404, dict(body, error="StreamNotFound")
    if isinstance(c, SnapshotError):
        return 422, body
    if isinstance(c, (InputError, InputTypeError)):
        return 400, body
    return 503, body


# ================================================================================================
# Replica
# ================================================================================================
@serve.ingress(api)
class StreamReplica:
    """Holds and steps the streams routed to it (see the module docstring)."""

    def __init__(self, model_path: str, load_options: dict, directory, settings: dict):
        # ``settings`` are the defaults; Serve then calls reconfigure() with the user_config
        # (the same keys), which can change them later without restarting the replica.
        self.model = lstm_cpu.load(model_path, **load_options)
        self.model.stream()  # a bidirectional/reverse model raises UnsupportedModelError here
        self.fp = fingerprint(self.model)
        self.dir = directory
        self.batcher = StepBatcher(self.model, before_round=self._checkpoint_round)
        m = self.model
        h0, c0 = m.stream().state  # (L, out), (L, H): where every stream starts
        self._h0, self._c0 = h0, c0
        self._dims = (h0.shape[0], h0.shape[1], c0.shape[1])  # L, out, H
        # Load (or compile) the kernels now, not on the first client's step.
        x0 = np.zeros(m.input_size, m.dtype)
        self.batcher.step_group([(StreamRecord("", h0, c0), x0)])
        self.batcher.step_group([(StreamRecord("", h0, c0), x0), (StreamRecord("", h0, c0), x0)])
        ctx = serve.get_replica_context()
        self.me = ctx.replica_id.unique_id
        self._app, self._deployment = ctx.app_name, ctx.deployment
        self._streams: dict = {}  # stream id -> StreamRecord
        self._acquiring: dict = {}  # stream id -> Future of an ongoing claim
        self._ready: Optional[asyncio.Future] = None
        self._peer = None
        self._reaper: Optional[asyncio.Task] = None
        self._closing = False
        self._dir_incarnation: Optional[str] = None
        self._I, self._O = m.input_size, m.output_size
        self._frame = 4 * m.input_size  # bytes of one float32 input frame
        self.reconfigure(settings)

    def reconfigure(self, settings: dict) -> None:
        """Apply ``max_batch``, ``batch_wait_ms``, ``idle_timeout_s`` and ``checkpoint_every``."""
        m = self.model
        self.idle_timeout_s = float(settings["idle_timeout_s"])
        self.checkpoint_every = int(settings["checkpoint_every"])
        self.batcher.max_batch = int(settings["max_batch"])
        self.batcher.wait_s = float(settings["batch_wait_ms"]) / 1000.0
        self._info = {"input_size": m.input_size, "output_size": m.output_size,
                      "dtype": str(m.dtype), "fingerprint": self.fp.hex(), **settings}

    # -- setup ----------------------------------------------------------------------------------
    async def _setup(self):
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                self._dir_incarnation = await self.dir.register.remote(
                    self.me, ray.get_runtime_context().current_actor)
                self._peer = serve.get_deployment_handle(self._deployment, self._app)
                self._reaper = asyncio.get_running_loop().create_task(self._reap())
                self._ready.set_result(True)
            except BaseException as e:
                self._ready.set_exception(e)
                self._ready = None
                raise
        elif not self._ready.done():
            await self._ready

    def _check_x(self, x) -> np.ndarray:
        m = self.model
        try:
            a = np.asarray(x)
        except Exception as e:  # noqa: BLE001
            raise InputTypeError(f"x: expected a numeric array of shape ({m.input_size},), "
                                 f"got {type(x).__name__} ({e})") from None
        if a.dtype.kind not in "fiub":
            raise InputTypeError(f"x: expected a real numeric array of shape ({m.input_size},), "
                                 f"got dtype {a.dtype}")
        if a.shape != (m.input_size,):
            raise InputError(f"x: expected shape ({m.input_size},), got {a.shape}")
        return np.array(a, dtype=m.dtype)  # a private copy: the caller may reuse its buffer

    # -- stream ownership -----------------------------------------------------------------------
    async def _acquire(self, sid: str, create: bool, seq: Optional[int] = None) -> StreamRecord:
        while True:
            rec = self._streams.get(sid)
            if rec is not None:
                return rec
            fut = self._acquiring.get(sid)
            if fut is None:
                break
            await asyncio.wait([fut])
        fut = self._acquiring[sid] = asyncio.get_running_loop().create_future()
        try:
            return await self._claim(sid, create, seq)
        finally:
            fut.set_result(None)
            del self._acquiring[sid]

    def _install(self, sid, steps, h, c) -> StreamRecord:
        rec = self._streams[sid] = StreamRecord(sid, h, c, steps)
        return rec

    async def _claim(self, sid: str, create: bool, seq: Optional[int]) -> StreamRecord:
        deadline = time.monotonic() + CLAIM_DEADLINE_S
        while True:
            force = time.monotonic() > deadline
            res = await self.dir.claim.remote(sid, self.me, create, force)
            kind = res[0]
            if kind == "wait":
                await asyncio.sleep(0.1)
                continue
            if kind == "new":
                return self._install(sid, 0, self._h0.copy(), self._c0.copy())
            if kind == "unknown":
                raise StreamNotFound(sid)
            if kind == "expired":
                raise StreamExpired(sid, self.idle_timeout_s)
            if kind == "parked":
                return self._install(sid, *unpack(res[1], self.fp, *self._dims, self.model.dtype))
            if kind == "moved":
                try:
                    blob = await self._peer.release.remote(sid, self.me, _to=res[1])
                except Exception as e:  # noqa: BLE001 - not reachable from here yet, or dying
                    if not (_is(e, NotHere) or _is(e, ray.exceptions.RayActorError)
                            or _is(e, ray.exceptions.ActorUnavailableError)):
                        raise
                    blob = None
                if blob is None:  # not released (yet): ask the directory again
                    await asyncio.sleep(0.05)
                    continue
                return self._install(sid, *unpack(blob, self.fp, *self._dims, self.model.dtype))
            # "checkpoint": the owner is gone; continue from its last checkpoint (or step 0)
            blob, reason = res[1], res[2]
            if blob is None:
                rec = self._install(sid, 0, self._h0.copy(), self._c0.copy())
            else:
                rec = self._install(sid, *unpack(blob, self.fp, *self._dims, self.model.dtype))
            if seq is not None and seq == rec.steps:
                return rec  # the client is exactly at the checkpoint: nothing was lost
            raise StreamLost(sid, rec.steps, reason)

    async def release(self, stream_id: str, claimer: str, _to: Optional[str] = None):
        """Give stream ``stream_id`` to replica ``claimer``: its exact state as a blob, or None."""
        if _to != self.me:
            raise NotHere(f"release for {_to} reached {self.me}")
        fut = self._acquiring.get(stream_id)
        if fut is not None:
            await asyncio.wait([fut])
        rec = self._streams.pop(stream_id, None)
        if rec is None:
            return None
        await rec.idle()
        blob = pack(self.fp, rec.steps, rec.h, rec.c)
        await self.dir.moved.remote(stream_id, self.me, claimer)
        return blob

    async def _reroute(self, method: str, stream_id, *args, _hops: int = 0, **kwargs):
        """A request reached this replica while it shuts down: send it on to the stream's home."""
        if _hops > 50:
            raise StreamError(f"stream {stream_id!r}: no replica took the request (shutting down)")
        await asyncio.sleep(0.1)
        if self._peer is None:
            self._peer = serve.get_deployment_handle(self._deployment, self._app)
        return await getattr(self._peer, method).remote(stream_id, *args, _hops=_hops + 1, **kwargs)

    # -- the handle methods -----------------------------------------------------------------------
    async def step(self, stream_id, x, seq: Optional[int] = None, _hops: int = 0):
        """One sample of stream ``stream_id``: x (I,) -> y (out,); the first step of an unknown id
        starts a stream at the model's initial state. ``seq``, if given, is the number of steps
        the client has had answered: a mismatch raises StreamLost (never a value computed from
        another state)."""
        sid = check_stream_id(stream_id)
        xa = self._check_x(x)
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, (int, np.integer))
                                or seq < 0):
            raise InputError(f"seq: expected a non-negative int or None, got {seq!r}")
        if self._closing:
            return await self._reroute("step", sid, xa, seq=seq, _hops=_hops)
        await self._setup()
        while True:
            rec = await self._acquire(sid, True, seq)
            if self._streams.get(sid) is rec:
                break  # still ours (not released while the claim finished)
        if seq is not None and seq != rec.steps:
            raise StreamLost(sid, rec.steps, f"the client sent step {seq}, the stream is at "
                                             f"step {rec.steps}")
        return await self.batcher.submit(rec, xa)  # submitted synchronously after the check

    async def end(self, stream_id, _hops: int = 0) -> bool:
        """Free the stream; True if it existed (held, parked, lost or expired)."""
        sid = check_stream_id(stream_id)
        if self._closing:
            return await self._reroute("end", sid, _hops=_hops)
        await self._setup()
        existed = True
        try:
            await self._acquire(sid, False)
        except StreamNotFound:
            existed = False
        except StreamError:
            pass
        rec = self._streams.pop(sid, None)
        if rec is not None:
            await rec.idle()
        await self.dir.forget.remote([sid])
        return existed

    async def snapshot(self, stream_id, _hops: int = 0) -> bytes:
        sid = check_stream_id(stream_id)
        if self._closing:
            return await self._reroute("snapshot", sid, _hops=_hops)
        await self._setup()
        rec = await self._acquire(sid, False)
        await rec.idle()
        return pack(self.fp, rec.steps, rec.h, rec.c)

    async def restore(self, stream_id, blob, _hops: int = 0) -> int:
        """Set stream ``stream_id`` (new or not) to a snapshot's state; returns its step count."""
        sid = check_stream_id(stream_id)
        steps, h, c = unpack(blob, self.fp, *self._dims, self.model.dtype)  # typed errors first
        if self._closing:
            return await self._reroute("restore", sid, blob, _hops=_hops)
        await self._setup()
        await self.dir.revive.remote(sid)
        try:
            rec = await self._acquire(sid, True)
        except StreamLost:
            rec = self._streams[sid]  # installed from a checkpoint: overwritten below
        await rec.idle()
        rec.h, rec.c, rec.steps, rec.last = h, c, steps, time.monotonic()
        await self.dir.checkpoint.remote(self.me, {sid: (steps, bytes(blob))})
        return steps

    async def checkpoint(self, stream_id, _hops: int = 0) -> int:
        """Checkpoint the stream now; returns the step count it was taken at."""
        sid = check_stream_id(stream_id)
        if self._closing:
            return await self._reroute("checkpoint", sid, _hops=_hops)
        await self._setup()
        rec = await self._acquire(sid, False)
        await rec.idle()
        blob = pack(self.fp, rec.steps, rec.h, rec.c)
        await self.dir.checkpoint.remote(self.me, {sid: (rec.steps, blob)})
        return rec.steps

    async def where(self, stream_id, _hops: int = 0) -> Optional[str]:
        """The id of the replica holding the stream (None if no replica does)."""
        sid = check_stream_id(stream_id)
        if sid in self._streams:
            return self.me
        return await self.dir.owner.remote(sid)

    async def info(self, _to: Optional[str] = None) -> dict:
        """Model sizes, fingerprint and the service settings (``checkpoint_every``...)."""
        return dict(self._info)

    async def stats(self, _to: Optional[str] = None) -> dict:
        return {"replica": self.me, "streams": len(self._streams), "rounds": self.batcher.rounds,
                "stepped": self.batcher.stepped}

    # -- checkpoints, expiry, shutdown ----------------------------------------------------------
    async def _checkpoint_round(self, records) -> None:
        """Before a round: checkpoint the streams whose step count is a multiple of N.

        Taken before the step, so a checkpoint is never ahead of what the client has received:
        after a replica death the client resends at most N inputs and never misses an output."""
        n = self.checkpoint_every
        if n <= 0:
            return
        blobs = {r.sid: (r.steps, pack(self.fp, r.steps, r.h, r.c)) for r in records
                 if r.steps and r.steps % n == 0 and self._streams.get(r.sid) is r}
        if blobs:
            try:  # bounded: steps must not stall while the directory is being replaced
                await asyncio.wait_for(self.dir.checkpoint.remote(self.me, blobs),
                                       CHECKPOINT_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a missed checkpoint only widens a later replay
                log.warning("checkpoint of %d streams failed or timed out", len(blobs))

    async def _reap(self):
        """Every period: expire idle streams, and re-announce our streams to a restarted
        directory (it lost who owns what: a stream that moved would otherwise look new)."""
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.idle_timeout_s / 4)))
            try:
                if await self.dir.get_incarnation.remote() != self._dir_incarnation:
                    self._dir_incarnation = await self.dir.register.remote(
                        self.me, ray.get_runtime_context().current_actor, list(self._streams))
            except Exception:  # noqa: BLE001 - the directory is being replaced; next period
                log.warning("stream directory unreachable; retrying")
            now = time.monotonic()
            idle = [sid for sid, r in self._streams.items()
                    if now - r.last > self.idle_timeout_s
                    and (r.pending is None or r.pending.done()) and sid not in self._acquiring]
            if idle:
                # Until the directory has the tombstones, a step on these ids waits (as for a
                # claim in progress): it must get StreamExpired, not a claim of a "lost" stream.
                fut = asyncio.get_running_loop().create_future()
                for sid in idle:
                    del self._streams[sid]
                    self._acquiring[sid] = fut
                try:
                    await self.dir.expire.remote(self.me, idle)
                except Exception:  # noqa: BLE001
                    log.exception("expiring %d streams failed", len(idle))
                finally:
                    for sid in idle:
                        del self._acquiring[sid]
                    fut.set_result(None)

    async def __del__(self):
        """Graceful shutdown (scale-down, redeploy): park every stream's exact state."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        recs = list(self._streams.values())
        self._streams.clear()
        for r in recs:
            await r.idle()
        self.batcher.close()
        if self._ready is not None and self._ready.done() and recs:
            blobs = {r.sid: (r.steps, pack(self.fp, r.steps, r.h, r.c)) for r in recs}
            try:  # bounded: when the whole app is deleted, the directory may be gone already
                await asyncio.wait_for(self.dir.park.remote(self.me, blobs), PARK_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the streams then resume from their checkpoints
                log.exception("parking %d streams failed", len(blobs))

    # -- frames -----------------------------------------------------------------------------------
    def _decode(self, data: bytes) -> np.ndarray:
        if len(data) > self._frame:
            raise InputError(f"frame: oversized, {len(data)} bytes; expected {self._frame} "
                             f"({self._I} float32)")
        if len(data) != self._frame:
            raise InputError(f"frame: expected {self._frame} bytes ({self._I} float32), "
                             f"got {len(data)}")
        return np.frombuffer(data, "<f4")  # (I,)

    @staticmethod
    def _encode(y) -> bytes:
        return np.ascontiguousarray(y, "<f4").tobytes()

    # -- HTTP -------------------------------------------------------------------------------------
    @api.post("/streams/{stream_id}/step")
    async def http_step(self, stream_id: str, request: Request, seq: Optional[int] = None):
        """Body: raw little-endian float32 x (I,) -> raw float32 y (out,); or JSON {"x": [...]}
        -> {"y": [...], "steps": n}."""
        binary = request.headers.get("content-type", "").startswith("application/octet-stream")
        try:
            body = await self._read_capped(request)
            if binary:
                x = self._decode(body)
            else:
                try:
                    obj = json.loads(body)
                    x = obj["x"] if isinstance(obj, dict) else None
                except (ValueError, UnicodeDecodeError):
                    raise InputTypeError("request body: expected JSON {\"x\": [...]} or "
                                         "application/octet-stream float32") from None
                if not isinstance(x, list) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
                    raise InputTypeError("request body: \"x\" must be a list of numbers")
                x = np.asarray(x, np.float64)
            y = await self.step(stream_id, x, seq=seq)
        except Exception as e:  # noqa: BLE001 - every error becomes a typed HTTP answer
            status, err = _error_body(e)
            return Response(json.dumps(err), status_code=status, media_type="application/json")
        if binary:
            return Response(self._encode(y), media_type="application/octet-stream")
        return Response(json.dumps({"y": [float(v) for v in np.asarray(y)]}),
                        media_type="application/json")

    async def _read_capped(self, request: Request) -> bytes:
        """The request body, refused once it exceeds what any valid step needs (a JSON list of I
        numbers fits 64 bytes per number): a huge or endless body is never read in full."""
        cap = max(1 << 16, 64 * self._I)
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > cap:
            raise InputError(f"request body: oversized, {n} bytes (at most {cap})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise InputError(f"request body: oversized, more than {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @api.delete("/streams/{stream_id}")
    async def http_end(self, stream_id: str):
        try:
            return {"ended": await self.end(stream_id)}
        except Exception as e:  # noqa: BLE001
            status, err = _error_body(e)
            return Response(json.dumps(err), status_code=status, media_type="application/json")

    @api.get("/streams/{stream_id}/where")
    async def http_where(self, stream_id: str):
        try:
            return {"replica": await self.where(stream_id)}
        except Exception as e:  # noqa: BLE001
            status, err = _error_body(e)
            return Response(json.dumps(err), status_code=status, media_type="application/json")

    @api.get("/info")
    async def http_info(self):
        return await self.info()

    # -- WebSocket --------------------------------------------------------------------------------
    @api.websocket("/streams/ws")
    async def ws(self, websocket: WebSocket, stream_id: Optional[str] = None, keep: int = 0):
        """One stream per connection: a JSON hello, then binary float32 frames in and out.

        Bad frames (text, wrong size, oversized) get a JSON text frame ``{"error", "message"}``
        and leave the stream untouched; ``StreamLost`` adds ``resume_from``. The stream ends when
        the connection closes, unless ``keep=1``; reconnecting with its ``stream_id`` resumes it
        (the hello's ``steps`` says where it stands)."""
        await websocket.accept()
        sid = stream_id or f"ws-{uuid.uuid4().hex}"
        try:
            check_stream_id(sid)
            await self._setup()
            try:
                seq = (await self._acquire(sid, False)).steps  # an existing stream resumes
            except StreamNotFound:
                seq = 0
            except StreamLost as e:  # back at its checkpoint: the hello says from where
                seq = e.resume_from
        except Exception as e:  # noqa: BLE001 - e.g. StreamExpired: say so, then close
            await websocket.send_text(json.dumps(_error_body(e)[1]))
            await websocket.close(code=1008)
            return
        await websocket.send_text(json.dumps({"stream_id": sid, "input_size": self._I,
                                              "output_size": self._O, "dtype": "float32",
                                              "steps": seq}))
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    if msg.get("bytes") is None:
                        raise InputTypeError("frame: expected a binary frame of float32, got a "
                                             "text frame")
                    y = await self.step(sid, self._decode(msg["bytes"]), seq=seq)
                except Exception as e:  # noqa: BLE001
                    err = _error_body(e)[1]
                    if err["error"] == "StreamLost":
                        seq = err["resume_from"]
                    await websocket.send_text(json.dumps(err))
                    continue
                seq += 1
                await websocket.send_bytes(self._encode(y))
        except WebSocketDisconnect:
            pass
        finally:
            if not keep:
                try:
                    await self.end(sid)
                except Exception:  # noqa: BLE001
                    log.exception("ending stream %s", sid)
