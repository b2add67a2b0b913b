"""Do the kernels' hot loops use the machine's full vector width? (issue 12, item 4)

    python -m lstm_cpu.bench.asm                   # host and AVX2 targets, a markdown table
    python -m lstm_cpu.bench.asm --target host     # this CPU only (in this process)
    python -m lstm_cpu.bench.asm --target avx2     # Haswell-class code, in a child process
    python -m lstm_cpu.bench.asm --json            # the rows as JSON
    python -m lstm_cpu.bench.asm --family "step serial" --show 1   # print the hot loop's code

For each kernel family this compiles the entry point the engine itself calls, with the argument
types the engine passes (recorded from a small real model: :func:`engine_calls`), reads the
assembly LLVM produced and reports, per function, its hottest innermost loop: the FP arithmetic
by register width (zmm 512, ymm 256, xmm 128 bit, scalar), FMAs and dot products
(``vpdpbusd``, ``vdpbf16ps``) by width, stack spills and reloads inside the loop, and its length.

How the loops are found
-----------------------
The assembly is printed by a TargetMachine built with Numba's own options (CPU name, features,
opt level) and *verbose* output, so LLVM itself marks each basic block's loop (``This Inner Loop
Header: Depth=3``, ``in Loop: Header=BB7_7``), the IR block it came from (``%vector.body``) and
each spill (``64-byte Spill``, ``Folded Reload``): no guessing from jump targets. The hottest loop
of a function is the innermost one doing the most FP lanes per iteration (a zmm float32 op counts
16, a scalar one 1), so the vectoriser's main body wins over its remainder loops and over the
scalar fallback it keeps for arrays that may overlap.

Why the AVX2 target runs in a child process: Numba reads ``NUMBA_CPU_NAME`` and
``NUMBA_CPU_FEATURES`` once, when its CPU target starts; the child also gets an empty
``NUMBA_CACHE_DIR`` (and ``LSTM_CPU_NO_CACHE=1``), so Haswell code never lands in the normal
cache, and Numba's cache, which is keyed on the CPU, is not consulted either.

Cached code has no assembly in Numba, so every entry point is compiled again as an uncached twin
(:func:`uncached_twin`: the same Python function and flags); its callees are linked in from
their own (possibly cached) bitcode and optimised with the twin, exactly as for the original.
This is a development tool next to the runtime: ``import lstm_cpu`` never loads it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

#: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES of the AVX2 target (a Haswell-class CPU: AVX2 + FMA, 16
#: ymm registers), as bench/gemm_probe.py documents them.
AVX2_ENV = {"NUMBA_CPU_NAME": "haswell",
            "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2"}

#: Lanes per register for float32 (a float64 op counts half as many; only used to rank loops).
_LANES = {"zmm": 16, "ymm": 8, "xmm": 4, "scalar": 1}
_BITS = {"zmm": 512, "ymm": 256, "xmm": 128}

# =============================================================================================
# Assembly: loops, their FP arithmetic by width, spills
# =============================================================================================
_BLOCK = re.compile(r"^(?:\.L(BB\w+)|# %bb\.\d+):\s*(?:#\s*(%\S+))?")
_HEADER = re.compile(r"=>\s*This (Inner )?Loop Header: Depth=(\d+)")
_IN_LOOP = re.compile(r"in Loop: Header=(BB\w+) Depth=(\d+)")
_FUNC = re.compile(r"^([A-Za-z_$][\w.$]*):")
_FMA = re.compile(r"^vfn?m(?:add|sub|addsub|subadd)\d{3}([ps])[sdh]$")
_ARITH = re.compile(r"^v(?:mul|add|sub|div|min|max|sqrt)([ps])[sdh]$")
_DOT = re.compile(r"^(vpdpbusds?|vpdpwssds?|vdpbf16ps|vpmaddwd|vpmaddubsw)$")
_REG = re.compile(r"%([xyz]mm)\d+")


@dataclass
class Loop:
    """One innermost loop of the assembly, as LLVM's verbose output delimits it."""

    header: str  # "BB7_26": the loop header's basic block
    block: str  # "%vector.body221": the IR block of the header (vectoriser names say a lot)
    function: str  # the demangled Numba function ("lstm_cpu.kernels._gemm_rows")
    depth: int  # loop depth (1 = outermost)
    instrs: int = 0  # instructions in the loop's blocks
    fp: Dict[str, int] = field(default_factory=dict)  # FP arithmetic by width: zmm/ymm/xmm/scalar
    fma: Dict[str, int] = field(default_factory=dict)  # of which FMAs, by width
    dot: Dict[str, int] = field(default_factory=dict)  # dot products (vpdpbusd, vdpbf16ps...)
    vspills: int = 0  # vector spills + reloads (incl. folded reloads) in the loop
    gspills: int = 0  # general-register spills + reloads in the loop
    code: List[str] = field(default_factory=list, repr=False)

    @property
    def lanes(self) -> int:
        """FP lanes per iteration (float32 lanes; the ranking key)."""
        return sum(_LANES[w] * n for w, n in self.fp.items()) + sum(
            _LANES[w] * n for w, n in self.dot.items())

    @property
    def density(self) -> float:
        """FP lanes per instruction: how much of the loop is vector math."""
        return self.lanes / max(self.instrs, 1)

    @property
    def widest(self) -> str:
        """The widest register of its FP arithmetic: "zmm", "ymm", "xmm", "scalar" or "none"."""
        for w in ("zmm", "ymm", "xmm", "scalar"):
            if self.fp.get(w) or self.dot.get(w):
                return w
        return "none"

    def share(self, width: str) -> float:
        """Fraction of its FP arithmetic (dot products included) done at ``width``."""
        total = sum(self.fp.values()) + sum(self.dot.values())
        return (self.fp.get(width, 0) + self.dot.get(width, 0)) / total if total else 0.0

    def summary(self) -> str:
        def fmt(d):
            return "/".join(f"{d.get(w, 0)}" for w in ("zmm", "ymm", "xmm", "scalar"))
        s = f"fp {fmt(self.fp)} fma {fmt(self.fma)}"
        if self.dot:
            s += f" dot {fmt(self.dot)}"
        return s + f" (zmm/ymm/xmm/scalar), spills {self.vspills} vec + {self.gspills} gpr, {self.instrs} instrs"


def demangle(symbol: str) -> str:
    """``_ZN8lstm_cpu7kernels10_gemm_rowsB2v7B86c8...`` -> ``lstm_cpu.kernels._gemm_rows``
    (Numba's Itanium-style names: length-prefixed parts, then ABI tags starting with B)."""
    if not symbol.startswith("_ZN"):
        return symbol
    parts, s = [], symbol[3:]
    while s and s[0].isdigit():
        n = re.match(r"\d+", s).group(0)
        parts.append(s[len(n):len(n) + int(n)])
        s = s[len(n) + int(n):]
    return ".".join(parts) or symbol


def _classify(ins: str):
    """(kind, width) of an instruction: kind "fma", "arith", "dot" or None; width of its
    destination (AT&T: the last register) or "scalar" for ss/sd/sh forms."""
    parts = ins.split(None, 1)
    op = parts[0]
    regs = _REG.findall(parts[1]) if len(parts) > 1 else []
    for kind, pat in (("fma", _FMA), ("arith", _ARITH)):
        m = pat.match(op)
        if m:
            return kind, ("scalar" if m.group(1) == "s" else (regs[-1] if regs else "xmm"))
    if _DOT.match(op):
        return "dot", regs[-1] if regs else "xmm"
    return None, None


def parse_loops(asm: str) -> List[Loop]:
    """The innermost loops of verbose assembly, in order of appearance."""
    blocks = []  # (header of its loop or None, is this a header, inner, depth, block, fn, lines)
    fn = ""
    cur = None
    for line in asm.splitlines():
        m = _BLOCK.match(line)
        if m:
            cur = {"label": m.group(1), "block": m.group(2) or "", "fn": fn, "comments": [], "code": []}
            blocks.append(cur)
            continue
        m = _FUNC.match(line)
        if m and not line.startswith("."):
            fn, cur = m.group(1), None
            continue
        if cur is None:
            continue
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            cur["comments"].append(s)
        elif not s.startswith("."):
            cur["code"].append(s)
    loops: Dict[str, Loop] = {}
    inner: Dict[str, bool] = {}
    members = collections.defaultdict(list)
    for b in blocks:
        head = None
        text = " ".join(b["comments"])
        m = _HEADER.search(text)
        if m and b["label"]:
            head = b["label"]
            inner[head] = bool(m.group(1))
            loops[head] = Loop(head, b["block"], demangle(b["fn"]), int(m.group(2)))
        else:
            m = _IN_LOOP.search(text)
            if m:
                head = m.group(1)
        if head:
            members[head].append(b)
    out = []
    for head, loop in loops.items():
        if not inner.get(head):
            continue
        fp, fma, dot = collections.Counter(), collections.Counter(), collections.Counter()
        for b in members[head]:
            for ins in b["code"]:
                loop.code.append(ins)
                kind, width = _classify(ins)
                if kind == "dot":
                    dot[width] += 1
                elif kind:
                    fp[width] += 1
                    if kind == "fma":
                        fma[width] += 1
                if "Spill" in ins or "Reload" in ins:
                    if _REG.search(ins.split("#")[0]) and not re.search(r"\b[48]-byte", ins):
                        loop.vspills += 1
                    else:
                        loop.gspills += 1
        loop.instrs = len(loop.code)
        loop.fp, loop.fma, loop.dot = dict(fp), dict(fma), dict(dot)
        out.append(loop)
    return out


def hot_loops(loops: List[Loop], min_fp: int = 4) -> Dict[str, Loop]:
    """Per function, its hot loop: among its innermost loops doing at least half the FP lanes
    per instruction of its densest one, the one doing the most FP lanes per iteration. That is
    the loop doing the math: the vectoriser's main body rather than its remainder loops
    (narrower registers) or the scalar fallback it keeps for arrays that may overlap, the widest
    register block of a gemm, and a branch-free fast path rather than a vectorised general path
    (``_epilogue`` vectorises its peephole/clip branch, at a tenth of the common case's density). Functions
    whose loops all hold fewer than ``min_fp`` FP instructions are left out.
    {function: loop}, most lanes first."""
    by_fn = collections.defaultdict(list)
    for lp in loops:
        if lp.lanes:
            by_fn[lp.function].append(lp)
    best: Dict[str, Loop] = {}
    for fn, lps in by_fn.items():
        if max(sum(lp.fp.values()) + sum(lp.dot.values()) for lp in lps) < min_fp:
            continue
        top = max(lp.density for lp in lps)
        best[fn] = max((lp for lp in lps if lp.density >= 0.5 * top), key=lambda lp: lp.lanes)
    return dict(sorted(best.items(), key=lambda kv: -kv[1].lanes))


# =============================================================================================
# Compiling what the engine compiles
# =============================================================================================
def uncached_twin(dispatcher):
    """A fresh ``@njit`` of ``dispatcher``'s Python function with its flags but no cache (Numba
    keeps no assembly for code loaded from its cache)."""
    from numba import njit

    opts = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("nopython", "cache")}
    return njit(**opts)(dispatcher.py_func)


def verbose_asm(dispatcher, sig) -> str:
    """The assembly of ``dispatcher``'s compiled ``sig``, printed with LLVM's loop and spill
    comments (a TargetMachine with Numba's options and verbose output); plain ``inspect_asm``
    text (no loop structure) if Numba's internals differ."""
    try:
        import llvmlite.binding as ll
        from numba.core import config

        lib = dispatcher.overloads[sig].library
        opts = dict(opt=config.OPT)
        lib.codegen._customize_tm_options(opts)
        tm = ll.Target.from_triple(ll.get_process_triple()).create_target_machine(**opts)
        tm.set_asm_verbosity(True)
        return str(tm.emit_assembly(lib._final_module))
    except Exception:  # pragma: no cover - a Numba without these internals
        return dispatcher.inspect_asm(sig)


def _axpy_probe(W, z, acc):
    """acc (C,) += W (K, C)^T z (K,): the plainest vectorisable float32 loop."""
    for k in range(W.shape[0]):
        zk = z[k]
        for j in range(W.shape[1]):
            acc[j] += W[k, j] * zk


def preferred_register() -> str:
    """The register LLVM vectorises a plain float32 loop with for the current target: what the
    target's tuning prefers, which is not always its widest. Measured with LLVM 22: "zmm" for
    znver4; "ymm" for skylake-avx512 and icelake-server (their tuning has ``prefer-256-bit``),
    and for znver4 with ``+prefer-256-bit`` in NUMBA_CPU_FEATURES."""
    import numba

    fn = numba.njit(fastmath={"contract"}, error_model="numpy")(_axpy_probe)
    args = (np.zeros((4, 256), np.float32), np.zeros(4, np.float32), np.zeros(256, np.float32))
    sig = tuple(numba.typeof(a) for a in args)
    fn.compile(sig)
    hot = hot_loops(parse_loops(verbose_asm(fn, sig)))
    return next(iter(hot.values())).widest if hot else "scalar"


def target() -> dict:
    """What Numba compiles for: CPU name, its widest vector registers (``isa_reg``), the register
    LLVM prefers for it (``full_reg``: what a hot loop should use, :func:`preferred_register`)
    and the features the reduced kernels select on."""
    from numba.core import config

    from .. import kernels_quant as KQ

    feats = KQ.host_features()
    cpu = config.CPU_NAME or "host"
    try:
        import llvmlite.binding as ll

        if cpu == "host":
            cpu = f"host ({ll.get_host_cpu_name()})"
    except Exception:  # pragma: no cover
        pass
    isa = "zmm" if KQ.has_avx512(feats) else "ymm" if "avx" in feats else "xmm"
    full = preferred_register()
    return {"cpu": cpu, "isa_reg": isa, "full_reg": full, "full_bits": _BITS.get(full, 32),
            "avx512": KQ.has_avx512(feats), "vnni512": KQ.has_vnni512(feats),
            "bf16dp": KQ.has_bf16dp(feats)}


@contextlib.contextmanager
def _recording(calls):
    """While active, the engine's kernel calls are recorded, not run: ``kernels.compiled_entry``
    (every stream's step and the reduced step) and the whole-sequence
    kernels. Each (dispatcher, args) lands in ``calls``; the engine gets a no-op back."""
    from .. import kernels

    saved = {n: getattr(kernels, n) for n in ("compiled_entry", "layer_sequence_serial",
                                              "layer_sequence_parallel")}

    def entry(dispatcher, args):
        calls.append((dispatcher, tuple(args)))
        return lambda *a: None

    def seq(name):
        def call(*args):
            calls.append((saved[name], args))
        return call

    kernels.compiled_entry = entry
    kernels.layer_sequence_serial = seq("layer_sequence_serial")
    kernels.layer_sequence_parallel = seq("layer_sequence_parallel")
    try:
        yield calls
    finally:
        for n, v in saved.items():
            setattr(kernels, n, v)


def _layers(I, H, L, rng):
    from ..spec import LayerParams

    return [[LayerParams(rng.uniform(-.3, .3, (4 * H, I if l == 0 else H)),
                         rng.uniform(-.3, .3, (4 * H, H)), rng.uniform(-.3, .3, 4 * H))]
            for l in range(L)]


#: The kernel families: what each exercises in the engine.
FAMILIES = {
    "step serial": "Stream.step, serial (stack_step_serial: panel_product + _epilogue_common; _axpy_rows for projection/head)",
    "step serial f64": "Stream.step of a float64 model (stack_step_serial, float64)",
    "step parallel": "Stream.step, parallel (stack_step_parallel: panel_product over panel ranges)",
    "run serial": "Stream.run, serial (stack_run_serial)",
    "sequence serial": "LSTMModel.run, serial (layer_sequence_serial)",
    "sequence parallel": "LSTMModel.run, parallel (layer_sequence_parallel)",
    "reduced int8": "Stream.step of an int8 model (kernels_quant: the host's int8 step)",
    "reduced bfloat16": "Stream.step of a bfloat16 model (kernels_quant: the host's bf16 step)",
}


def engine_calls(families=None) -> Dict[str, tuple]:
    """{family: (dispatcher, args)}: the kernel call the engine makes for each family, recorded
    from real models (I=32, H=64, 2 layers) built and driven through the public API."""
    from .. import kernels
    from ..model import LSTMModel

    want = set(FAMILIES if families is None else families)
    rng = np.random.default_rng(0)
    layers = _layers(32, 64, 2, rng)
    out = {}

    def record(name, fn, pick=None):
        if name not in want:
            return
        calls = []
        with _recording(calls):
            fn()
        calls = [c for c in calls if pick is None or c[0] is pick]
        out[name] = calls[0]

    m32 = LSTMModel(layers)
    record("step serial", lambda: m32.stream(kernel="serial"), kernels.stack_step_serial)
    record("step serial f64", lambda: LSTMModel(layers, dtype=np.float64).stream(kernel="serial"),
           kernels.stack_step_serial)
    record("step parallel", lambda: m32.stream(kernel="parallel"), kernels.stack_step_parallel)
    if "run serial" in want:
        s = m32.stream(kernel="serial")  # stream.run calls its kernel directly: the same args
        xs = np.zeros((4, 32), np.float32)
        out["run serial"] = (kernels.stack_run_serial,
                             (xs, *s._wargs, np.empty((4, s._ylen), np.float32)))
    x = np.zeros((3, 4, 32), np.float32)
    record("sequence serial", lambda: m32.run(x, kernel="serial"))
    record("sequence parallel", lambda: m32.run(x, kernel="parallel"))
    # Reduced models: built inside the recording, so their error estimate runs no kernel.
    for fmt in ("int8", "bfloat16"):
        name = f"reduced {fmt}"
        if name in want:
            calls = []
            with _recording(calls):
                LSTMModel(layers, weights=fmt).stream()
            out[name] = [c for c in calls if c[0].__module__.endswith("kernels_quant")][0]
    return out


def gemm_calls(names=None) -> Dict[str, tuple]:
    """{"gemm " + name: (kernel, args)} for ``lstm_cpu.gemm.KERNELS`` and ``CELLS`` (the
    register-blocked probes of issue 12, not wired into the engine yet) on (N, K, C) = (4, 96, 256)."""
    from .. import gemm as G

    out = {}
    Z = np.zeros((4, 96), np.float32)  # (N, K)
    A = np.zeros((4, 256), np.float32)  # (N, C)
    for name, fn in G.KERNELS.items():
        if names is None or name in names:
            P = int(name[1:].split("_")[0])
            out[f"gemm {name}"] = (fn, (Z, np.zeros((256 // P, 96, P), np.float32), A))
    for name, fn in G.CELLS.items():
        if names is None or name in names:
            U = int(name[1:].split("_")[0])
            out[f"cells {name}"] = (fn, (Z, np.zeros((64 // U, 96, 4 * U), np.float32),
                                         np.zeros((64 // U, 4 * U), np.float32),
                                         np.zeros((4, 64), np.float32), np.zeros((4, 64), np.float32)))
    return out


def compile_loops(dispatcher, args) -> List[Loop]:
    """Compile an uncached twin of ``dispatcher`` for the types of ``args``; its innermost loops."""
    import numba

    twin = uncached_twin(dispatcher)
    sig = tuple(numba.typeof(a) for a in args)
    twin.compile(sig)
    return parse_loops(verbose_asm(twin, sig))


# =============================================================================================
# Verdicts
# =============================================================================================
def verdict(hot: Dict[str, Loop], full: str) -> str:
    """"full" when every function's hot loop does all its FP arithmetic at the full width
    ``full`` ("zmm", "ymm"); else names the narrow ones (``function: widest register``)."""
    if not hot:
        return "no FP loop"
    narrow = [f"{fn.rsplit('.', 1)[-1]}: {lp.widest}" for fn, lp in hot.items() if lp.share(full) < 1.0]
    return "full" if not narrow else "NARROW (" + ", ".join(narrow) + ")"


def all_calls(families=None) -> Dict[str, tuple]:
    """{family: (dispatcher, args)} for the engine's families and the gemm probes, or those
    named in ``families`` (engine family names, "gemm p32_r2_g2", "cells u16_r2")."""
    if families is None:
        return {**engine_calls(), **gemm_calls()}
    probes = [f.split(" ", 1)[1] for f in families if f.startswith(("gemm ", "cells "))]
    eng = [f for f in families if f in FAMILIES]
    unknown = set(families) - set(eng) - {f for f in families if f.startswith(("gemm ", "cells "))}
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; known: {sorted(FAMILIES)}, gemm NAME, cells NAME")
    calls = engine_calls(eng) if eng else {}
    if probes:
        calls.update({k: v for k, v in gemm_calls(probes).items() if k in families})
    return calls


def check(families=None, code=False) -> dict:
    """Compile every family (or those named) for the current target: {"target": target(),
    "families": {name: {"entry", "verdict", "hot": {function: loop as a dict}}}}."""
    tgt = target()
    out = {}
    for name, (fn, args) in all_calls(families).items():
        hot = hot_loops(compile_loops(fn, args))
        rows = {}
        for k, v in hot.items():
            d = asdict(v)
            if not code:
                d.pop("code")
            rows[k] = dict(d, summary=v.summary(), lanes=v.lanes, widest=v.widest)
        out[name] = {"entry": f"{fn.py_func.__module__}.{fn.py_func.__name__}",
                     "verdict": verdict(hot, tgt["full_reg"]), "hot": rows}
    return {"target": tgt, "families": out}


def run_target(which: str, families=None, code=False) -> dict:
    """:func:`check` for ``which`` = "host" (this process) or "avx2" (a child process with the
    Haswell target, an empty Numba cache and lstm-cpu's cache off)."""
    if which == "host":
        return check(families, code)
    env = dict(os.environ, **AVX2_ENV, LSTM_CPU_NO_CACHE="1")
    with tempfile.TemporaryDirectory(prefix="lstm-cpu-asm-") as cache:
        env["NUMBA_CACHE_DIR"] = cache
        cmd = [sys.executable, "-m", "lstm_cpu.bench.asm", "--target", "host", "--json"]
        cmd += ["--code"] if code else []
        cmd += ["--family", ",".join(families)] if families else []
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"the AVX2 child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)["host"]


# =============================================================================================
# Report
# =============================================================================================
def _cell(lp: Optional[dict]) -> str:
    if lp is None:
        return "-"
    fp = "/".join(str(lp["fp"].get(w, 0) + lp["dot"].get(w, 0)) for w in ("zmm", "ymm", "xmm", "scalar"))
    fma = sum(lp["fma"].values()) + sum(lp["dot"].values())
    return f"**{lp['widest']}** {fp}, {fma} fma/dot, {lp['vspills']}+{lp['gspills']} spills, {lp['instrs']} ins"


def table(results: Dict[str, dict]) -> str:
    """Markdown: one row per (family, function); per target its hot loop (widest register; FP
    ops zmm/ymm/xmm/scalar; FMAs and dot products; spills vector+gpr; instructions) and the
    family's verdict."""
    names = list(results)
    lines = ["| family | function | " + " | ".join(f"{n} hot loop | {n}" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    fams = list(dict.fromkeys(f for r in results.values() for f in r["families"]))
    for fam in fams:
        fns = list(dict.fromkeys(fn for r in results.values() for fn in r["families"].get(fam, {}).get("hot", {})))
        for i, fn in enumerate(fns or [""]):
            cells = []
            for n in names:
                fr = results[n]["families"].get(fam)
                cells += [_cell(fr["hot"].get(fn)) if fr else "-", (fr["verdict"] if fr else "-") if i == 0 else ""]
            lines.append(f"| {fam if i == 0 else ''} | {fn.rsplit('.', 1)[-1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="both", choices=("host", "avx2", "both"))
    ap.add_argument("--family", default=None, help="comma-separated family names (default: all)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--code", action="store_true", help="keep each hot loop's instructions")
    ap.add_argument("--show", action="store_true", help="print each hot loop's instructions")
    args = ap.parse_args(argv)
    fams = args.family.split(",") if args.family else None
    code = args.code or args.show
    results = {w: run_target(w, fams, code)
               for w in (("host", "avx2") if args.target == "both" else (args.target,))}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for which, r in results.items():
        t = r["target"]
        print(f"# {which}: numba target {t['cpu']}, widest registers {t['isa_reg']}, LLVM's preferred "
              f"(the verdicts' reference) {t['full_reg']} ({t['full_bits']} bit)")
    print(table(results))
    if args.show:
        for which, r in results.items():
            for fam, f in r["families"].items():
                for fn, lp in f["hot"].items():
                    print(f"\n## {which} / {fam} / {fn} (`{lp['block']}`): {lp['summary']}")
                    print("\n".join("    " + c for c in lp.get("code", [])))


if __name__ == "__main__":
    main()
