"""The ``lstm-cpu`` command (also ``python -m lstm_cpu``).

Subcommands: ``bench``, ``convert``, ``info``, ``run``, ``warmup``. Each has ``--help``.

Exit status: 0 success, 1 failure (unreadable file, bad model, a runtime error), 2 bad usage
(unknown option, malformed value). Errors are one line on stderr, ``lstm-cpu: error: ...``; the
traceback is printed only with ``--debug``. ``--json`` prints one JSON document on stdout and
keeps notes and progress on stderr.

This module imports only the standard library, numpy, numba and lstm_cpu at module level.
Peers (onnxruntime, torch, openvino), tqdm and matplotlib are imported inside the functions that
use them, and a missing one is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

import numpy as np

PROG = "lstm-cpu"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


# =============================================================================================
# Argument parsing with one-line errors
# =============================================================================================
class UsageError(Exception):
    """Bad command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line) instead of printing usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _size(text: str):
    parts = text.replace("x", ",").split(",")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(
            f"expected three positive integers I,H,L (e.g. 64,256,2), got {text!r}")
    return vals


def _peer_list(text: str) -> List[str]:
    from .bench import PEERS  # noqa: PLC0415

    if text.strip().lower() in ("", "none"):
        return []
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    aliases = {"ort": "onnxruntime", "onnx": "onnxruntime", "pytorch": "torch", "ov": "openvino",
               "ort-int8": "onnxruntime-int8"}
    names = [aliases.get(n, n) for n in names]
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown peer {bad[0]!r}; expected a comma-separated list of {', '.join(PEERS)} or 'none'")
    return list(dict.fromkeys(names))


def _common(debug_default) -> _Parser:
    """Options accepted both before and after the subcommand."""
    p = _Parser(add_help=False)
    p.add_argument("--debug", action="store_true", default=debug_default,
                   help="print the full traceback on errors")
    return p


def _load_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("model loading")
    g.add_argument("--prefix", metavar="P",
                   help="torch state dict: key prefix of the LSTM's weights (e.g. 'encoder.rnn.')")
    g.add_argument("--node", metavar="N", help="ONNX: name of the LSTM node when there are several")
    g.add_argument("--weights", choices=("float32", "int8", "bfloat16"),
                   help="gate matrices in this format (default: the file's own; int8 and bfloat16 "
                        "measure their max abs output error against float32 over 1,000 steps)")


def build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Numba CPU inference for LSTM networks: streaming steps with persistent state.",
        epilog="Exit status: 0 success, 1 failure, 2 bad usage. "
               f"'{PROG} COMMAND --help' describes each command.",
        parents=[_common(False)],
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = [_common(argparse.SUPPRESS)]

    # --- bench ----------------------------------------------------------------------------------
    b = sub.add_parser(
        "bench", parents=common, help="time lstm-cpu against onnxruntime, torch and OpenVINO",
        description=(
            "Time lstm-cpu against its peers on the same weights. Without MODEL, an embedded "
            "fixed-seed LSTM (I=64, H=256, 2 layers; see --size) is used. Each peer's outputs are "
            "first checked against ours on a short sequence (max abs diff printed; > 1e-4 is a "
            "MISMATCH). Runtimes are then timed in interleaved rounds with the state fed back "
            "every call; the report gives p50/p90/p99/max µs per step, steps/s and the ratio to "
            "lstm-cpu, our JIT compile and cold-start times apart from the steady state, and our "
            "weight bandwidth next to a memory copy and a numpy BLAS product over the same weights."),
        epilog=(
            "Modes: 'step' one stream at batch 1, one step per call (model.stream().step(x)); "
            "'streams' --batch N streams stepped together (model.stream(batch=N)); 'sequence' a "
            "whole sequence of --seq-len steps at --batch per call (model.run). In sequence mode "
            "--steps and --warmup count whole-sequence calls and times are per time step."),
    )
    b.add_argument("model", nargs="?", metavar="MODEL",
                   help="model file (.onnx, .pt/.pth, .safetensors, packed); default: embedded")
    b.add_argument("--mode", choices=("step", "sequence", "streams"), default="step",
                   help="what one timed call does (default: step)")
    b.add_argument("--steps", type=_positive_int, metavar="N",
                   help="timed calls per runtime (default: 2000 step, 500 streams, 10 sequence)")
    b.add_argument("--warmup", type=_nonneg_int, metavar="N",
                   help="untimed calls per runtime before timing (default: 200, 50, 2)")
    b.add_argument("--rounds", type=_positive_int, default=10, metavar="R",
                   help="interleaved rounds the timed calls are split into (default: 10)")
    b.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="threads for every runtime (default: 1)")
    b.add_argument("--seq-len", type=_positive_int, default=500, metavar="T",
                   help="sequence length in sequence mode (default: 500)")
    b.add_argument("--batch", type=_positive_int, metavar="N",
                   help="batch size: streams (default 64) or sequence (default 1) mode")
    b.add_argument("--compare", type=_peer_list, metavar="PEERS",
                   help="comma-separated peers among onnxruntime,torch,openvino,onnxruntime-int8 "
                        "(quantize_dynamic of the same model), or 'none' (default: those of the "
                        "first three installed)")
    b.add_argument("--size", type=_size, metavar="I,H,L",
                   help="input size, hidden size and layers of the embedded model (default: 64,256,2)")
    b.add_argument("--seed", type=int, default=0, help="seed of the embedded model (default: 0)")
    b.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    b.add_argument("--plot", metavar="FILE.png", help="write latency distributions (needs matplotlib)")
    b.add_argument("--cold-process", action="store_true",
                   help="also time import + first step in fresh processes, with Numba's cache "
                        "and with an empty one (a true JIT compile); takes seconds")
    b.add_argument("--membw-mb", type=_nonneg_int, default=256, metavar="MB",
                   help="size of the array copied to measure memory bandwidth (0: skip; default 256)")
    prog = b.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="always show a progress bar (default: on a terminal, for runs > ~1.5 s)")
    prog.add_argument("--no-progress", dest="progress", action="store_false",
                      help="never show a progress bar")
    _load_options(b)
    b.set_defaults(func=cmd_bench)

    # --- convert --------------------------------------------------------------------------------
    c = sub.add_parser(
        "convert", parents=common, help="convert a model to lstm-cpu's packed format",
        description="Load IN (ONNX, torch .pt/.pth/.safetensors or packed) with lstm_cpu.load and "
                    "save it in lstm-cpu's packed format to OUT.")
    c.add_argument("input", metavar="IN", help="source model file")
    c.add_argument("output", metavar="OUT", help="packed model file to write")
    c.add_argument("--json", action="store_true", help="print model info of OUT as JSON")
    _load_options(c)
    c.set_defaults(func=cmd_convert)

    # --- info -----------------------------------------------------------------------------------
    i = sub.add_parser(
        "info", parents=common, help="describe a model",
        description="Print what lstm-cpu sees in MODEL: source format, input/hidden/projection "
                    "sizes, layers, directions, activations, parameter count and weight bytes.")
    i.add_argument("model", metavar="MODEL", help="model file")
    i.add_argument("--json", action="store_true", help="print model.info() as JSON")
    i.add_argument("--all", action="store_true",
                   help="list every LSTM found in MODEL (lstm_cpu.inspect) instead of loading one")
    _load_options(i)
    i.set_defaults(func=cmd_info)

    # --- run ------------------------------------------------------------------------------------
    r = sub.add_parser(
        "run", parents=common, help="run a sequence from a .npy file through a model",
        description="Run the sequence in --input (a .npy of shape (T, I) or (T, B, I), time-major) "
                    "through MODEL and write the outputs (T, out) or (T, B, out) to --output. "
                    "Without --output a summary is printed.")
    r.add_argument("model", metavar="MODEL", help="model file")
    r.add_argument("--input", "-i", required=True, metavar="FILE.npy", help="input sequence")
    r.add_argument("--output", "-o", metavar="FILE.npy", help="where to write the outputs")
    r.add_argument("--stream", action="store_true",
                   help="step one time step at a time through a stream, carrying the state")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    _load_options(r)
    r.set_defaults(func=cmd_run)

    # --- warmup ---------------------------------------------------------------------------------
    w = sub.add_parser(
        "warmup", parents=common, help="compile every kernel into Numba's cache ahead of time",
        description="Compile every lstm-cpu kernel into Numba's on-disk cache, so that the first "
                    "call of a later process loads instead of compiling; print where the cache is.")
    w.add_argument("--json", action="store_true", help="print the result as JSON")
    w.set_defaults(func=cmd_warmup)

    # --- serve ----------------------------------------------------------------------------------
    s = sub.add_parser(
        "serve", parents=common, help="serve streams on Ray Serve (pip install 'lstm-cpu[serve]')",
        description="Deploy MODEL as a stateful stream service on Ray Serve (lstm_cpu.serve): "
                    "WebSocket /streams/ws, HTTP POST /streams/{id}/step. Starts a local Ray "
                    "instance, or joins the cluster at --address; runs until interrupted.")
    s.add_argument("model", metavar="MODEL", help="model file, readable at this path on every node")
    s.add_argument("--replicas", type=_positive_int, default=2, metavar="N",
                   help="stream replicas (default: 2)")
    s.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join: ray://HOST:10001, HOST:6379 or 'auto' "
                        "(default: start a local Ray instance)")
    s.add_argument("--port", type=_nonneg_int, default=8000, metavar="P",
                   help="HTTP port (default: 8000)")
    s.add_argument("--host", default="127.0.0.1",
                   help="HTTP host (default: 127.0.0.1; the service has no authentication)")
    s.add_argument("--checkpoint-every", type=_nonneg_int, default=100, metavar="N",
                   help="checkpoint each stream every N steps (0: on demand only; default: 100)")
    s.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                   help="free streams idle for S seconds (default: 300)")
    _load_options(s)
    s.set_defaults(func=cmd_serve)
    return parser


# =============================================================================================
# Helpers
# =============================================================================================
def _err(msg: str):
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


def _note(msg: str):
    _err(f"note: {msg}")


def _emit_json(obj):
    sys.stdout.write(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def _jsonable(o):
    """Turn numpy scalars/arrays, tuples and dataclass-like objects into JSON types."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if o is None or isinstance(o, (str, int, float, bool)):
        return o
    if hasattr(o, "name") and hasattr(o, "alpha"):  # spec.Activation
        return {"name": o.name, "alpha": o.alpha, "beta": o.beta}
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    return str(o)


def _check_file(path: str, what: str):
    """Raise a one-line FileNotFoundError-style failure before a loader gets a confusing path."""
    if not os.path.exists(path):
        raise _Failure(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise _Failure(f"{what} is a directory, expected a file: {path}")


class _Failure(Exception):
    """A failure with a message ready for the user: exit status 1."""


def _load_model(path: str, args) -> object:
    _check_file(path, "model file")
    import lstm_cpu  # noqa: PLC0415 - import numba only when a command needs it

    opts = {k: getattr(args, k, None) for k in ("prefix", "node", "weights")}
    opts = {k: v for k, v in opts.items() if v is not None}
    return lstm_cpu.load(path, **opts)


def _model_info(model) -> Dict[str, object]:
    """model.info(), completed from the model's attributes when a field is missing."""
    try:
        info = dict(model.info())
    except AttributeError:
        info = {}
    fallback = {
        "input_size": getattr(model, "input_size", None),
        "hidden_size": getattr(model, "hidden_size", None),
        "proj_size": getattr(model, "proj_size", None),
        "num_layers": getattr(model, "num_layers", None),
        "num_directions": getattr(model, "num_directions", None),
        "output_size": getattr(model, "output_size", None),
    }
    for k, v in fallback.items():
        if k not in info and v is not None:
            info[k] = v
    return info


def _fmt_act(a) -> str:
    """'Sigmoid', or 'HardSigmoid(alpha=0.2, beta=0.5)' for functions that take parameters."""
    if isinstance(a, (list, tuple)) and len(a) == 3:
        name, alpha, beta = a
    elif hasattr(a, "name"):
        name, alpha, beta = a.name, a.alpha, a.beta
    else:
        return str(a)
    from .spec import ACTIVATIONS  # noqa: PLC0415

    takes = ACTIVATIONS.get(name, (0, 0, 0, 0))[3]
    if takes == 0:
        return str(name)
    if takes == 1:
        return f"{name}(alpha={alpha:g})"
    return f"{name}(alpha={alpha:g}, beta={beta:g})"


def _fmt_activations(acts, directions: int) -> str:
    """info()["activations"] (one (f, g, h) triple per layer and direction) in one line."""
    try:
        triples = [", ".join(_fmt_act(a) for a in t) for t in acts]
    except TypeError:
        return str(acts)
    if not triples:
        return "?"
    if len(set(triples)) == 1:
        return f"{triples[0]} (f, g, h; every layer)"
    d = max(int(directions or 1), 1)
    parts = []
    for k, t in enumerate(triples):
        where = f"layer {k // d}" + (f" dir {k % d}" if d > 1 else "")
        parts.append(f"{where}: {t}")
    return "; ".join(parts)


def _fmt_source(src) -> str:
    if isinstance(src, dict):
        fmt = src.get("format", "?")
        rest = ", ".join(f"{k}={v}" for k, v in src.items() if k != "format" and v not in ("", None))
        return f"{fmt} ({rest})" if rest else str(fmt)
    return str(src)


def _fmt_bytes(v) -> str:
    v = int(v)
    return f"{v:,} ({v / 1e6:.2f} MB)" if v >= 10_000 else f"{v:,}"


# (key of model.info(), label, formatter) in display order; other keys follow as they come.
_INFO_ROWS = [
    ("source", "source", lambda v, i: _fmt_source(v)),
    ("input_size", "input size", None),
    ("hidden_size", "hidden size", None),
    ("proj_size", "projection", lambda v, i: str(v) if v else "none"),
    ("num_layers", "layers", None),
    ("num_directions", "directions",
     lambda v, i: {1: "1 (unidirectional)", 2: "2 (bidirectional)"}.get(v, str(v))),
    ("output_size", "output size", None),
    ("head_size", "head", lambda v, i: f"Linear to {v}" if v else "none"),
    ("activations", "activations", lambda v, i: _fmt_activations(v, i.get("num_directions", 1))),
    ("clip", "cell clip", lambda v, i: "none" if v in (None, 0) else f"{v:g}"),
    ("input_forget", "input forget", lambda v, i: "coupled (f = 1 - i)" if v else "no"),
    ("peepholes", "peepholes", lambda v, i: "yes" if v else "no"),
    ("has_initial_state", "initial state", lambda v, i: "baked in" if v else "zeros"),
    ("dtype", "dtype", None),
    ("parameters", "parameters", lambda v, i: f"{int(v):,}"),
    ("parameter_count", "parameters", lambda v, i: f"{int(v):,}"),
    ("weight_bytes", "weight bytes", lambda v, i: _fmt_bytes(v)),
    ("weights", "weights", None),
    ("weight_error", "weight error", lambda v, i: _fmt_weight_error(v, i)),
]


def _fmt_weight_error(v, info) -> str:
    if info.get("weights", "float32") == "float32":
        return "none (float32 weights)"
    if v is None:
        return "not measured (imported already quantized: no float32 model to compare with)"
    return f"{v:.2e} max abs output vs float32, 1,000-step random stream"
_INFO_HIDDEN = {"format"}  # shown inside "source"


def format_info(info: Dict[str, object]) -> str:
    """model.info() as aligned "label  value" lines."""
    rows, labels = [], set()
    known = {k for k, _, _ in _INFO_ROWS} | _INFO_HIDDEN
    if "source" not in info and "format" in info:
        info = dict(info, source={"format": info["format"]})
    for key, label, fmt in _INFO_ROWS:
        if key in info and label not in labels:
            v = info[key]
            rows.append((label, fmt(v, info) if fmt else str(v)))
            labels.add(label)
    for key, v in info.items():
        if key not in known:
            rows.append((key.replace("_", " "), json.dumps(_jsonable(v)) if isinstance(v, (dict, list)) else str(v)))
    width = max(len(k) for k, _ in rows) if rows else 0
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# =============================================================================================
# Commands
# =============================================================================================
def cmd_info(args) -> int:
    if args.all:
        _check_file(args.model, "model file")
        import dataclasses

        import lstm_cpu  # noqa: PLC0415 - import numba only when a command needs it
        from lstm_cpu.candidates import format_table

        cands = lstm_cpu.inspect(args.model)
        if args.json:
            _emit_json([dataclasses.asdict(c) for c in cands])
        else:
            print(format_table(cands))
        return EXIT_OK
    info = _model_info(_load_model(args.model, args))
    if args.json:
        _emit_json(info)
    else:
        print(format_info(info))
    return EXIT_OK


def cmd_convert(args) -> int:
    model = _load_model(args.input, args)
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise _Failure(f"OUT is the same file as IN ({args.output}); choose another name")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise _Failure(f"output directory not found: {out_dir}")
    model.save(args.output)
    size = os.path.getsize(args.output)
    if args.json:
        _emit_json({"input": args.input, "output": args.output, "bytes": size,
                    "info": _model_info(model)})
    else:
        print(f"wrote {args.output} ({size:,} bytes)")
    return EXIT_OK


def cmd_run(args) -> int:
    model = _load_model(args.model, args)
    _check_file(args.input, "input file")
    try:
        x = np.load(args.input, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refuse them
        raise _Failure(f"cannot read {args.input} as a numeric .npy without pickle: {e}") from None
    except (OSError, EOFError) as e:
        raise _Failure(f"cannot read {args.input} as .npy: {e}") from None
    if not isinstance(x, np.ndarray):
        x.close()
        raise _Failure(f"{args.input} is a zip archive (.npz or similar), not a .npy file; "
                       "expected one array saved with numpy.save")
    if x.ndim not in (2, 3):
        raise _Failure(f"input must be (T, I) or (T, B, I), time-major; got shape {x.shape} "
                       f"from {args.input}")
    if x.shape[-1] != model.input_size:
        raise _Failure(f"input's last axis must be the model's input size {model.input_size}; "
                       f"got shape {x.shape} from {args.input}")
    if args.output:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise _Failure(f"output directory not found: {out_dir}")
    t0 = time.perf_counter()
    if args.stream:
        # One time step per call, the stream carrying h and c: (I,) or (B, I) per step.
        s = model.stream(batch=None if x.ndim == 2 else x.shape[1])
        ys = [np.array(s.step(x[t]), copy=True) for t in range(x.shape[0])]
        y = np.stack(ys) if ys else np.zeros((0,) + x.shape[1:-1] + (model.output_size,), np.float32)
    else:
        y, _ = model.run(x)
        y = np.asarray(y)
    elapsed = time.perf_counter() - t0
    if args.output:
        np.save(args.output, y, allow_pickle=False)
    summary = {
        "input": args.input, "input_shape": list(x.shape), "output": args.output,
        "output_shape": list(y.shape), "dtype": str(y.dtype), "stream": bool(args.stream),
        "seconds": elapsed,
        "output_min": float(y.min()) if y.size else None,
        "output_max": float(y.max()) if y.size else None,
        "output_mean": float(y.mean()) if y.size else None,
    }
    if args.json:
        _emit_json(summary)
    else:
        where = f"wrote {args.output}" if args.output else "no --output given, not saved"
        print(f"ran {x.shape} -> {y.shape} {y.dtype} in {elapsed * 1e3:.1f} ms "
              f"({'stream' if args.stream else 'run'}); {where}")
        if not args.output and y.size:
            print(f"output min {y.min():.6g}, max {y.max():.6g}, mean {y.mean():.6g}; "
                  f"last step: {np.array2string(y[-1].ravel()[:8], precision=5)}"
                  + (" ..." if y[-1].size > 8 else ""))
    return EXIT_OK


def _cache_dir(compiled) -> str:
    """Where Numba caches lstm-cpu's kernels: asked of the kernels' dispatchers themselves (Numba
    falls back to a per-user directory when the package folder is read-only), else the config."""
    import numba  # noqa: PLC0415

    candidates = list(_iter_items(compiled))
    try:
        from . import kernels  # noqa: PLC0415

        candidates += [getattr(kernels, n) for n in dir(kernels)]
    except ImportError:  # pragma: no cover - the runtime always has kernels
        pass
    for item in candidates:
        path = getattr(getattr(item, "_cache", None), "_cache_path", None)
        if path:
            return str(path)
    if numba.config.CACHE_DIR:
        return str(numba.config.CACHE_DIR)
    import lstm_cpu  # noqa: PLC0415

    return os.path.join(os.path.dirname(os.path.abspath(lstm_cpu.__file__)), "__pycache__")


def _cache_files(cache: str) -> int:
    """Number of Numba cache files (index + data) of lstm-cpu's kernels in ``cache``."""
    try:
        return sum(1 for f in os.listdir(cache) if f.endswith((".nbi", ".nbc")))
    except OSError:
        return 0


def _iter_items(obj):
    if isinstance(obj, dict):
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set)):
        yield from obj


def _describe_compiled(compiled) -> List[str]:
    out = []
    if isinstance(compiled, dict):
        for k, v in compiled.items():
            out.append(f"{k}: {v}" if not callable(v) else str(k))
    elif isinstance(compiled, (list, tuple, set)):
        for v in compiled:
            name = getattr(v, "__name__", None) or getattr(getattr(v, "py_func", None), "__name__", None)
            sigs = getattr(v, "signatures", None)
            out.append(f"{name} ({len(sigs)} signatures)" if name and sigs is not None else str(v))
    elif isinstance(compiled, (int, np.integer)):
        out.append(f"{int(compiled)} kernels")
    elif compiled is not None:
        out.append(str(compiled))
    return out


def cmd_warmup(args) -> int:
    import lstm_cpu  # noqa: PLC0415

    warm = getattr(lstm_cpu, "warmup", None)
    if warm is None:
        raise _Failure("this lstm_cpu has no warmup(); cannot precompile")
    t0 = time.perf_counter()
    compiled = warm()
    elapsed = time.perf_counter() - t0
    cache = _cache_dir(compiled)
    items = _describe_compiled(compiled)
    files = _cache_files(cache)
    if args.json:
        _emit_json({"seconds": elapsed, "cache_dir": cache, "cache_files": files,
                    "compiled": items})
    else:
        print(f"compiled {len(items)} kernel variant(s) in {elapsed:.1f} s: {', '.join(items)}")
        print(f"numba cache: {cache} ({files} files)")
    return EXIT_OK


def cmd_serve(args) -> int:
    try:
        from .serve.cli import serve_command  # noqa: PLC0415 - imports ray; the serve extra
    except ImportError as e:
        raise _Failure(f"serve needs Ray Serve: pip install 'lstm-cpu[serve]' ({e})") from None
    return serve_command(args)


def cmd_bench(args) -> int:
    from . import bench  # noqa: PLC0415

    if args.batch is not None and args.mode == "step" and args.batch != 1:
        raise UsageError("--batch applies to --mode streams and --mode sequence; "
                         "mode 'step' is one stream at batch 1")
    if args.model and args.size:
        raise UsageError("--size picks the embedded model; it cannot be combined with MODEL")
    import numba  # noqa: PLC0415

    if args.threads > numba.config.NUMBA_NUM_THREADS:
        raise UsageError(f"--threads must be at most {numba.config.NUMBA_NUM_THREADS} "
                         f"(NUMBA_NUM_THREADS), got {args.threads}")
    if args.model:
        _check_file(args.model, "model file")
    compare = args.compare
    if compare is None:
        compare = bench.installed_peers()
        missing = [p for p in bench.DEFAULT_PEERS if p not in compare]
        if missing:
            _note(f"not installed, skipped: {', '.join(missing)}")
    cfg = bench.BenchConfig(
        mode=args.mode, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
        threads=args.threads, seq_len=args.seq_len, batch=args.batch, compare=compare,
        size=args.size or bench.DEFAULT_SIZE, seed=args.seed, model_path=args.model,
        load_options={"prefix": args.prefix, "node": args.node}, membw_mb=args.membw_mb,
        weights=args.weights,
        cold_process=args.cold_process, progress=args.progress,
        command=" ".join([PROG] + list(args._argv)),
    )
    # Notes go to stderr as they happen, so that they are seen even if a later step fails.
    # Text mode: notes are part of the report; a mismatch is also shown at once.
    quiet = lambda m: None  # noqa: E731
    quiet.quiet = True
    res = bench.run_bench(cfg, echo=_note if args.json else quiet)
    if args.plot:
        note = bench.plot_latencies(res, args.plot)
        if note:
            _note(note)
            res["notes"].append(note)
        else:
            res["plot"] = args.plot
    if args.json:
        _emit_json(bench.public_result(res))
    else:
        print(bench.format_report(res))
        if args.plot and "plot" in res:
            print(f"plot: {args.plot}")
    return EXIT_OK


# =============================================================================================
# Entry point
# =============================================================================================
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version print and "exit"
            return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
        debug = bool(getattr(args, "debug", False))
        if args.version:
            from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

            try:
                print(f"{PROG} {version('lstm-cpu')}")
            except PackageNotFoundError:
                print(f"{PROG} (not installed; running from source)")
            return EXIT_OK
        if not args.command:
            raise UsageError(f"a command is required: bench, convert, info, run, serve or warmup "
                             f"(see '{PROG} --help')")
        args._argv = argv
        return args.func(args)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        _err(f"error: {_one_line(str(e))}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("error: interrupted")
        return 130
    except BrokenPipeError:  # `lstm-cpu info m.onnx | head -1`: the reader left; not an error to report
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return EXIT_FAILURE
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into a status
        if isinstance(e, SystemExit):
            raise
        if debug:
            traceback.print_exc()
        _err(f"error: {_describe_error(e)}")
        return EXIT_FAILURE


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe_error(e: BaseException) -> str:
    from .errors import LSTMError, UnsupportedModelError  # noqa: PLC0415

    if isinstance(e, _Failure):
        return _one_line(str(e))
    if isinstance(e, UnsupportedModelError):
        return _one_line(f"unsupported model: {e}")
    if isinstance(e, LSTMError):
        # The message already names what was expected and what came.
        return _one_line(str(e))
    if isinstance(e, FileNotFoundError):
        return _one_line(f"file not found: {e.filename or e}")
    if isinstance(e, PermissionError):
        return _one_line(f"permission denied: {e.filename or e}")
    if isinstance(e, OSError):
        return _one_line(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    if isinstance(e, MemoryError):
        return "out of memory"
    return _one_line(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
