"""A small asyncio TCP service: one shared LSTM model, one stream per connection.

Each client connection owns a :class:`lstm_cpu.Stream` of one model loaded once at start-up
(the model is immutable and shared; a stream owns only its ``h``, ``c`` and scratch). Every input
sample a client sends gets exactly one output back, in order.

Run::

    python examples/stream_server.py                      # embedded default model, port 8765
    python examples/stream_server.py --model m.onnx --port 0 --print-port

Protocol (all integers unsigned 32-bit little-endian, all vectors float32 little-endian)
--------------------------------------------------------------------------------------
On connect the server sends a hello::

    u32 input_size I   u32 output_size O

then the client sends frames and the server answers each with one frame, in order::

    client -> server    u32 n   n bytes
        n == 4*I        one input sample x (I float32)   -> reply: u32 4*O, then y (O float32)
        n == 0          reset the stream to its initial state -> reply: u32 0
        anything else   protocol error                   -> reply: u32 0xFFFFFFFF, u32 m,
                                                              m bytes UTF-8 message; then close

Clients may pipeline (send several frames before reading replies); replies keep the order of
the frames. A client that disconnects, even mid-frame, just loses its stream.

Why the step runs inline on the event loop
------------------------------------------
One step of the default model (I=64, H=256, L=2, float32) takes ~0.1 ms with the serial kernel,
and a step releases the GIL. ``asyncio.to_thread`` would add a thread hop per sample (tens of µs,
plus GIL hand-offs) to make the loop wait a little less; with a step this short that costs more
than it saves, and the loop still can never block for longer than one step. So the default is
inline; ``--offload`` (``asyncio.to_thread``) is there for models whose step takes milliseconds.

Streams use ``kernel="serial"``: with many connections the parallelism is across streams, not
inside one step, and a parallel kernel on a busy machine waits for a descheduled worker thread
(we measured ~16 ms per step instead of ~0.1 ms on a 2-core box under load).

Service pattern for state: ``s.state`` is a copy ``(h, c)`` that can be stored (e.g. when a
client reconnects elsewhere) and restored with ``s.state = (h, c)``; ``s.reset()`` starts over.
This server exposes only reset; see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import struct
import sys
from typing import Optional

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import lstm_cpu  # noqa: E402
from lstm_cpu import LayerParams, LSTMModel  # noqa: E402

HELLO = struct.Struct("<II")  # input_size, output_size
LEN = struct.Struct("<I")
RESET = 0
ERROR = 0xFFFFFFFF
DEFAULT_PORT = 8765


def default_model(seed: int = 0, I: int = 64, H: int = 256, L: int = 2) -> LSTMModel:
    """The embedded default: a fixed-seed (I=64, H=256, L=2) float32 model, PyTorch's init range."""
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(H)
    layers = [[LayerParams(w_ih=rng.uniform(-s, s, (4 * H, I if l == 0 else H)),  # (4H, in)
                           w_hh=rng.uniform(-s, s, (4 * H, H)),  # (4H, H)
                           bias=rng.uniform(-s, s, 4 * H))]  # (4H,)
              for l in range(L)]
    return LSTMModel(layers, source={"format": "embedded", "seed": seed})


def require_loopback(host: str) -> None:
    """This example serves loopback only: no authentication, no TLS."""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"this example serves loopback only (127.0.0.1, ::1), got host {host!r}")


class StreamServer:
    """One shared model; each connection gets its own stream.

    Args:
        model: the shared :class:`LSTMModel` (unidirectional, forward).
        kernel: kernel of the per-connection streams ("serial": see the module docstring).
        offload: step in ``asyncio.to_thread`` instead of inline.
    """

    def __init__(self, model: LSTMModel, host: str = "127.0.0.1", port: int = 0, kernel: str = "serial",
                 offload: bool = False):
        require_loopback(host)
        self.model, self.host, self.port = model, host, port
        self.kernel, self.offload = kernel, offload
        self.server: Optional[asyncio.base_events.Server] = None
        self.connections = 0  # currently open
        self.served = 0  # samples answered, all connections
        self.errors = 0  # protocol errors

    async def start(self):
        # Compile / load the kernel from Numba's cache now, not on the first client's first sample.
        self.model.stream(kernel=self.kernel).step(np.zeros(self.model.input_size, np.float32))
        self.server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.host, self.port

    async def close(self):
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        m = self.model
        I, O = m.input_size, m.output_size
        stream = m.stream(kernel=self.kernel)  # this connection's state
        x = np.empty(I, np.float32)  # (I,) reused input buffer
        y = np.empty(O, np.float32)  # (O,) reused output buffer
        reply_hdr = LEN.pack(4 * O)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are tiny
        self.connections += 1
        try:
            writer.write(HELLO.pack(I, O))
            while True:
                try:
                    n = LEN.unpack(await reader.readexactly(4))[0]
                except asyncio.IncompleteReadError:
                    break  # the client closed (possibly mid-header)
                if n == RESET:
                    stream.reset()
                    writer.write(LEN.pack(0))
                elif n == 4 * I:
                    try:
                        payload = await reader.readexactly(n)
                    except asyncio.IncompleteReadError:
                        break  # closed mid-frame
                    x[:] = np.frombuffer(payload, "<f4")
                    if self.offload:
                        await asyncio.to_thread(stream.step, x, y)
                    else:
                        stream.step(x, out=y)
                    writer.write(reply_hdr + y.tobytes())
                    self.served += 1
                else:
                    # Never read a client-chosen length: reply with an error and hang up.
                    self.errors += 1
                    msg = f"frame of {n} bytes; expected {4 * I} (one float32 sample of size {I}) or 0 (reset)"
                    raw = msg.encode()
                    writer.write(LEN.pack(ERROR) + LEN.pack(len(raw)) + raw)
                    break
                await writer.drain()  # backpressure: a client that stops reading stops being served
        except (ConnectionError, OSError):
            pass  # reset by peer: the stream simply goes away
        finally:
            self.connections -= 1
            try:
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


async def serve(model, host, port, kernel, offload, print_port):
    srv = StreamServer(model, host, port, kernel=kernel, offload=offload)
    host, port = await srv.start()
    if print_port:
        print(port, flush=True)
    else:
        print(f"serving {model!r} on {host}:{port} (one stream per connection, kernel={kernel}, "
              f"{'offloaded' if offload else 'inline'} steps)", flush=True)
    async with srv.server:
        await srv.server.serve_forever()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model file (.onnx, .pt, .safetensors, packed); default: embedded")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    ap.add_argument("--kernel", default="serial", choices=["serial", "parallel", "auto"])
    ap.add_argument("--offload", action="store_true", help="step in asyncio.to_thread")
    ap.add_argument("--print-port", action="store_true", help="print only the bound port (for scripts)")
    args = ap.parse_args(argv)
    require_loopback(args.host)
    model = lstm_cpu.load(args.model) if args.model else default_model()
    try:
        asyncio.run(serve(model, args.host, args.port, args.kernel, args.offload, args.print_port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
