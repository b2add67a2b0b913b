"""Errors of the stream service (``lstm_cpu.serve``); no Ray import, so clients can catch them.

Each carries its fields as constructor arguments (``__reduce__``) so that it survives Ray's
pickling between replica, ingress and client: a caller catches ``StreamLost`` even when Ray
wraps it in a ``RayTaskError``, and reads ``e.resume_from``.
"""

from __future__ import annotations

from ..errors import FormatError, LSTMError


class StreamError(LSTMError):
    """Root of the stream service's errors."""


class StreamLost(StreamError):
    """The stream's state moved back to the one it had after ``resume_from`` steps.

    The service holds that state now: resend your inputs from step ``resume_from`` (0-based) on,
    and every output from there is exact. ``resume_from == 0`` means the stream is at the
    model's initial state. Raised when a replica died (the state comes from the last checkpoint),
    when no checkpoint was reachable, or when the ``seq`` a client sent does not match the
    service's step count. Never a silent reset: a value is either exact or this error.
    """

    def __init__(self, stream_id, resume_from: int, reason: str = ""):
        self.stream_id, self.resume_from, self.reason = stream_id, int(resume_from), reason
        super().__init__(f"stream {stream_id!r}: state lost past step {resume_from}; resend inputs "
                         f"from step {resume_from} on" + (f" ({reason})" if reason else ""))

    def __reduce__(self):
        return (type(self), (self.stream_id, self.resume_from, self.reason))


class StreamExpired(StreamError):
    """The stream was idle past ``idle_timeout_s`` and was freed; ``end`` it to reuse the id."""

    def __init__(self, stream_id, idle_timeout_s: float):
        self.stream_id, self.idle_timeout_s = stream_id, float(idle_timeout_s)
        super().__init__(f"stream {stream_id!r} expired after {idle_timeout_s:g} s idle; its state "
                         f"was freed (call end({stream_id!r}) to start the id afresh)")

    def __reduce__(self):
        return (type(self), (self.stream_id, self.idle_timeout_s))


class StreamNotFound(StreamError, LookupError):
    """``snapshot``/``checkpoint`` of a stream id the service does not know (or that ended)."""

    def __init__(self, stream_id):
        self.stream_id = stream_id
        super().__init__(f"no stream {stream_id!r}: it was never stepped, or it was ended")

    def __reduce__(self):
        return (type(self), (self.stream_id,))


class SnapshotError(StreamError, FormatError):
    """A snapshot blob is truncated, corrupt or not a snapshot."""


class ModelMismatch(SnapshotError):
    """A snapshot blob was taken from a different model (its fingerprint differs)."""


class NotHere(StreamError):
    """Internal: a request addressed to one replica reached another (routing view out of date)."""


__all__ = ["StreamError", "StreamLost", "StreamExpired", "StreamNotFound", "SnapshotError",
           "ModelMismatch"]
