"""The kernel policy: serial or parallel, and how a parallel kernel splits its work, decided in one place.

Every path that runs a model (a stream, N batched streams, a whole sequence) asks
:func:`choose_kernel`; nothing else compares sizes with thresholds. The thresholds below were
measured on the project's 2-core machines (bench/results.md); change them only with a new
measurement.

What the choice never changes: a result's bits. The serial and parallel twins compute every
output element in the same float order (the parallel one splits units across threads, see
``layout.py``), and Numba's batched product gives a stream (or a sequence) the bits it gets
alone. (Until 2026-11-27, 40+ streams or sequences of models under 1 MB took numpy BLAS products,
which round differently; the Numba kernels had overtaken them: bench/results.md.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .layout import PANEL, unit_ranges

#: What callers may ask for. "auto" lets the rules below decide.
KERNELS = ("auto", "serial", "parallel")

#: A lone stream runs the parallel kernel by default from this many weight bytes. Measured on 2
#: cores (bench/results.md, "crossover"): at 0.4 MB parallel is 1.5x slower, at 3.7 MB a tie, at
#: 14.7 MB 2.5x faster. Below it, waking a thread costs more than it saves; and on a loaded box a
#: parallel step waits for a descheduled worker (1-16 ms seen), so only models large enough to
#: gain a lot use it by default.
PARALLEL_MIN_WEIGHT_BYTES = 8 << 20

#: N batched streams (N >= 2) run the parallel kernel by default once weight
#: bytes x N (what a step streams through the product) reach this: their tasks are (group of
#: four streams, unit range), so even a narrow model has N/4 of them. Measured on 2 cores, serial
#: vs parallel us per step: (32,64,1) N=16 34/33, N=32 44/28; (64,128,1) N=8 33/33, N=16 64/59,
#: N=32 148/98; (128,256,2) N=4 145/121, N=32 972/547.
BATCH_PARALLEL_MIN_BYTES = 2 << 20

JOBS = ("step", "sequence")


@dataclass(frozen=True)
class KernelChoice:
    """What runs: ``parallel`` (a Numba prange twin) or not (the serial kernel)."""

    parallel: bool

    @property
    def name(self) -> str:
        """"serial" or "parallel", as ``Stream.kernel`` and ``info()`` report it."""
        return "parallel" if self.parallel else "serial"


def check_requested(requested) -> str:
    """``requested`` (None means "auto") validated against :data:`KERNELS`."""
    if requested is None:
        return "auto"
    if requested not in KERNELS:
        raise InputError(f"kernel must be one of {KERNELS}, got {requested!r}")
    return requested


#: ``model.run`` projects the inputs of a whole sequence in one pass over W only while those
#: projections (T x B x C values) take at most this many bytes; beyond it, in chunks of time
#: steps that take about this much, projected just before the recurrence reads them (while they
#: are still in cache, and into one buffer reused per chunk). Measured on the Zen 4 host, 1
#: thread, (128,256,2) B=16 T=200 (13 MB of projections a layer), us per step: whole 299 (323
#: with a fresh buffer per layer, as before), chunks of 16 / 32 / 64 steps 287 / 288 / 290.
SEQUENCE_CHUNK_BYTES = 2 << 20


def sequence_chunk(T: int, B: int, C: int, itemsize: int) -> int:
    """Time steps per input-projection chunk of ``model.run`` (T for no chunking)."""
    per_step = max(1, B * C * itemsize)
    if T * per_step <= 4 * SEQUENCE_CHUNK_BYTES:
        return max(1, T)
    return max(1, min(T, SEQUENCE_CHUNK_BYTES // per_step))


#: A batch of sequences that splits into stream groups (``SPLIT_MIN_STREAMS`` each, one per
#: thread) runs them in parallel under "auto" once weight bytes x B x T reach this: the groups
#: never wait for each other, so only the region's start (a few us per layer) is overhead.
#: Measured on 2 cores, (32,64,1) B=16 T=200 (1.6 MB x T), us per step: serial 11.6, split 7.7.
SPLIT_MIN_WORK_BYTES = 64 << 20

#: A lone sequence (B = 1) of a smaller model goes parallel under "auto" from this many weight
#: bytes once weight bytes x T also reach :data:`SPLIT_MIN_WORK_BYTES` (the team kernel opens one
#: region per layer; its start is amortised over the steps). Measured on the Zen 4 host, 2
#: threads, T=200, us per step serial / parallel: 0.10 MB (32,64,1) 0.92 / 1.22, 0.15 MB 1.37 /
#: 1.56, 0.22 MB 1.90 / 1.83, 0.30 MB 2.54 / 2.25, 0.39 MB (64,128,1) 3.36 / 2.70, 0.52 MB
#: (48,96,2) 4.08 / 3.75, 0.89 MB 7.3 / 4.7, 1.58 MB (128,256,1) 13.2 / 7.5 (onnxruntime on 2
#: threads at (64,128,1), T=500: 2.81). This virtual machine at times runs its two vCPUs on
#: one physical core (two-level 2-thread figures, bench/results.md): then the team loses below
#: about 1.2 MB (0.39 MB: 3.3 / 4.6-5.0, onnxruntime 4.0) and wins above (1.58 MB: 13.2 / 10.6).
#: The threshold follows two real cores; on a box whose two CPUs are hyperthreads of one core,
#: ask for kernel="serial" for models under about 1 MB (README, "Threads").
LONE_SEQUENCE_MIN_BYTES = 320 << 10


def choose_kernel(weight_bytes: int, streams: int, threads: int, requested="auto",
                  job: str = "step", steps: int = 1) -> KernelChoice:
    """The kernel for ``streams`` streams (or sequences) of a model whose gate matrices take
    ``weight_bytes``, on ``threads`` Numba threads.

    ``requested`` "serial" / "parallel" is honoured; "auto" follows the
    measured thresholds above. ``job`` "sequence" (``model.run``, B sequences) goes parallel
    once weight bytes x B reach :data:`BATCH_PARALLEL_MIN_BYTES`, a lone sequence included:
    since layout 7 its input projection is a Numba kernel too, so no OpenBLAS worker spins next
    to Numba's threads (they starved them 2.5x when it was a BLAS call). Measured on 2 cores,
    serial vs parallel us per step at T=100: (512,1024,1) B=1 404/174, (128,256,2) B=1 41/24,
    B=16 500/262; (32,64,1) B=16 (1.6 MB) 19.5/23.1 (two prange loops per step, before the
    one-region kernel). A batch that splits into stream groups (``sequence_team``) also goes
    parallel once weight bytes x B x ``steps`` reach :data:`SPLIT_MIN_WORK_BYTES`, and a lone
    sequence from :data:`LONE_SEQUENCE_MIN_BYTES` once weight bytes x ``steps`` reach it.
    """
    requested = check_requested(requested)
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    if requested != "auto":
        return KernelChoice(parallel=requested == "parallel")
    if threads <= 1:
        return KernelChoice(parallel=False)
    if streams == 1 and job == "step":
        return KernelChoice(parallel=weight_bytes >= PARALLEL_MIN_WEIGHT_BYTES)
    if (job == "sequence" and streams >= SPLIT_MIN_STREAMS * min(int(threads), 2)
            and weight_bytes * streams * max(1, int(steps)) >= SPLIT_MIN_WORK_BYTES):
        return KernelChoice(parallel=True)
    if (job == "sequence" and streams == 1 and weight_bytes >= LONE_SEQUENCE_MIN_BYTES
            and weight_bytes * max(1, int(steps)) >= SPLIT_MIN_WORK_BYTES):
        return KernelChoice(parallel=True)
    return KernelChoice(parallel=weight_bytes * streams >= BATCH_PARALLEL_MIN_BYTES)


#: ``model.run``'s parallel twin splits a batch into stream groups, one per thread, once every
#: group gets this many sequences (a full register block of the product, ``kernels._make_block``):
#: streams share nothing, so the threads never wait for each other. Below it, a team of threads
#: walks the time steps together, splitting each step's product and cells (``team.py``).
#: Measured on the Zen 4 host, 2 threads, one layer, T=200, us per step, serial / team / split
#: (before the split had private buffers and the serial kernel its views hoisted): (32,64,1)
#: B=16 8.7 / 8.5-21 / 7.2; (128,256,2) B=16 89 / 57-87 / 50; (512,1024,1) B=16 1,300 /
#: 670-745 / 700; B=1: (128,256,2) 12.5 / 6.1-9.0 (two prange loops per step: 8.7-13.9),
#: (512,1024,1) 224 / 98-100 (101-108). Now: `python bench/team_probe.py`.
SPLIT_MIN_STREAMS = 4


@dataclass(frozen=True)
class SequenceTeam:
    """How ``model.run``'s parallel kernels split a layer: ``stream_groups`` > 1 runs the batch
    as that many groups of sequences (``kernels.layer_run_split``: each group's projection and
    recurrence on one thread); otherwise the input projection runs on ``participants`` ranges of
    rows and a team of ``participants`` threads shares each time step as ``panel_ranges``
    ranges of the product and ``unit_ranges`` ranges of the cells
    (``kernels.layer_sequence_parallel``)."""

    participants: int
    panel_ranges: int
    unit_ranges: int
    stream_groups: int

    def args(self):
        """(P, RA, RB), as ``layer_sequence_parallel`` takes them."""
        return self.participants, self.panel_ranges, self.unit_ranges

    def tasks(self, B: int, projected: bool) -> int:
        """Claim slots the team needs (``team.sync_size``): all its task lists."""
        return self.panel_ranges + ((B + 3) // 4) * self.unit_ranges + (B if projected else 0)


#: ``model.run`` of at most this many time steps runs through the streaming kernels
#: (``LSTMModel._run_as_steps``): the same bits (tests/test_run_bits.py), without the sequence
#: kernels' fixed costs (the input projection's buffers and pass, and per layer a call or a
#: parallel region). Measured on 2 cores, us per call, sequence kernels / streaming kernels, B=1:
#: T=1 (32,64,1) 19 / 15, (128,256,2) 86 / 61 (2 threads 168 / 61), (512,1024,1) 693 / 541
#: (562 / 225); T=2 21 / 17, 121 / 102 (192 / 103), 986 / 1,013 (580 / 442); T=4 22 / 19,
#: 163 / 182, 1,678 / 2,147: from 4 steps on, a large model's batched projection wins.
#: (``run``'s own fixed cost, about 13 us of Python, stays: one sample at a time is a stream's job.)
RUN_AS_STEPS_MAX_T = 2


def run_as_steps(T: int, D: int, reverse: bool, lengths) -> bool:
    """Whether ``model.run`` of T steps goes through the streaming kernels: a forward,
    unidirectional model, every sequence its full T steps (lengths (B,) int64), and T at most
    :data:`RUN_AS_STEPS_MAX_T`."""
    return 0 < T <= RUN_AS_STEPS_MAX_T and D == 1 and not reverse and bool((lengths == T).all())


def sequence_team(B: int, threads: int, C: int, Hp: int) -> SequenceTeam:
    """How ``model.run``'s parallel kernels split B sequences of a layer with C gate columns
    (C / PANEL panels) and Hp padded units over ``threads`` threads."""
    threads = max(1, int(threads))
    groups = min(threads, B // SPLIT_MIN_STREAMS)
    if groups > 1:
        return SequenceTeam(threads, 1, 1, groups)
    ranges = min(threads, max(1, C // PANEL))
    return SequenceTeam(threads, ranges, unit_ranges(Hp, threads), 1)


def step_groups(streams: int, threads: int) -> int:
    """How many groups of streams a parallel batched step splits into, each group stepping
    whole on one thread (``kernels.stack_step_split``: one parallel region a step, no waits);
    0 to split each layer's product by panel ranges and its cells by unit ranges instead
    (``kernels.stack_step_parallel``: two regions a layer), which a lone stream or a few need.
    Split from :data:`SPLIT_MIN_STREAMS` streams a thread. Measured on the Zen 4 host, 2
    threads, us per step, serial / panel ranges / split (``bench/step_split_probe.py``):
    (32,64,1) N=8 6.1 / 9.0 / 5.2, N=64 43.9 / 44.9 / 24.3; (128,256,2) N=8 139 / 93 / 73,
    N=64 1,106 / 972 / 623; (512,1024,1) N=8 1,005 / 516 / 543 (each thread streams all 25 MB
    of weights: the one case where panel ranges win, by 5%), N=64 7,272 / 4,206 / 3,936."""
    groups = min(max(1, int(threads)), int(streams) // SPLIT_MIN_STREAMS)
    return groups if groups > 1 else 0


def reduced_groups(weight_bytes: int, streams: int, threads: int, requested="auto") -> int:
    """How many groups of streams (or sequences) a reduced-weight model's serial kernels run on
    at once, one per thread (``quant.ReducedBatch``, ``ReducedStack.run_groups``): 1 with one
    thread, fewer than 8 streams, "serial" asked for, or under "auto" below the batched rule
    above (weight bytes x streams < :data:`BATCH_PARALLEL_MIN_BYTES`); else one per thread, at
    least four streams each. ("parallel" on a reduced model runs the float kernels: see
    ``LSTMModel._reduced_for``.)"""
    requested = check_requested(requested)
    if requested == "serial" or threads <= 1 or streams < 8:
        return 1
    if requested == "auto" and weight_bytes * streams < BATCH_PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(int(threads), streams // 4))


__all__ = ["KERNELS", "SequenceTeam", "sequence_team", "run_as_steps", "RUN_AS_STEPS_MAX_T", "step_groups", "SPLIT_MIN_STREAMS", "SPLIT_MIN_WORK_BYTES", "LONE_SEQUENCE_MIN_BYTES", "reduced_groups", "sequence_chunk", "SEQUENCE_CHUNK_BYTES", "KernelChoice", "choose_kernel", "check_requested", "PARALLEL_MIN_WEIGHT_BYTES",
           "BATCH_PARALLEL_MIN_BYTES"]
