"""SIMD building blocks for Numba kernels: the host's vector features and explicit vector values.

Numba compiles for the host CPU (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` override it, and its
cache is keyed on the CPU), and LLVM vectorises plain loops well enough for most of our kernels.
Two kinds of kernel need more than that, and use this module:

* instructions LLVM never picks from plain code (``vpdpbusd``, ``vdpbf16ps``: kernels_quant.py);
* register blocks LLVM schedules badly from plain loops. The float32 gate product on 256-bit
  vectors is the case: a 64-column x 2-stream block spills (all 16 ymm are accumulators), and
  blocks of 32 columns written as loops ran at 5-6 GFLOP/s on both ISAs. The same product with
  explicit 8-lane values, 6 streams x 16 columns (12 ymm accumulators), runs at about 100
  (kernels.py, bench/avx2_block_probe.py).

A vector is an LLVM ``<n x T>`` value (:class:`VecType`), which Numba keeps in a register like any
scalar local. The operations are ``@intrinsic``s made per width by :func:`_vec_ops` (``_V16``:
zmm, ``_V8``: ymm). They trust their callers: no bounds checks, no negative-index wraparound,
and a load or store of n lanes at ``arr[i, j]`` reads ``arr[i, j : j + n]``, so the last axis
must be contiguous there (every array our kernels pass is).

An instruction the host lacks makes LLVM fail at compile time ("Cannot select") or the CPU fault
at run time, so a kernel that uses one is only ever *compiled* after :func:`host_features` says
the target has it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

# ---------------------------------------------------------------------------------------------
# Host features
# ---------------------------------------------------------------------------------------------
def host_features() -> frozenset:
    """The CPU features Numba compiles for (e.g. ``{"avx2", "avx512vnni", ...}``)."""
    try:
        from numba.core.registry import cpu_target

        feats = cpu_target.target_context.codegen()._tm_features
        on = {f[1:] for f in feats.split(",") if f.startswith("+")}
        if on:
            return frozenset(on)
    except Exception:  # pragma: no cover - a Numba without these internals
        pass
    import llvmlite.binding as llvm

    return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)


def has_vnni512(feats=None) -> bool:
    f = host_features() if feats is None else feats
    return {"avx512f", "avx512bw", "avx512vnni"} <= f


def has_vnni256(feats=None) -> bool:
    f = host_features() if feats is None else feats
    return "avxvnni" in f or {"avx512vl", "avx512vnni"} <= f


def has_avx512(feats=None) -> bool:
    f = host_features() if feats is None else feats
    return {"avx512f", "avx512bw"} <= f


def has_bf16dp(feats=None) -> bool:
    f = host_features() if feats is None else feats
    return {"avx512f", "avx512bf16"} <= f


def has_f16c(feats=None) -> bool:
    f = host_features() if feats is None else feats
    return "f16c" in f


# ---------------------------------------------------------------------------------------------
# A tiny SIMD vector type for Numba: an LLVM <n x T> value kept in registers across a loop
# ---------------------------------------------------------------------------------------------
class VecType(types.Type):
    def __init__(self, dtype, n):
        self.dtype = dtype
        self.n = n
        super().__init__(name=f"Vec{n}x{dtype}")


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        be = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.n)
        super().__init__(dmm, fe_type, be)


@intrinsic
def _u32_as_f32(typingctx, x):
    """The float32 with the bit pattern of uint32 x."""
    return types.float32(types.uint32), lambda ctx, b, sig, args: b.bitcast(args[0], _F32)


@intrinsic
def _f32_as_u32(typingctx, x):
    """The bit pattern of float32 x as uint32."""
    return types.uint32(types.float32), lambda ctx, b, sig, args: b.bitcast(args[0], _I32)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite.ir has no class for it; the IR is textual)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_I32 = ir.IntType(32)
_I16 = ir.IntType(16)
_I8 = ir.IntType(8)
_F32 = ir.FloatType()


def _ptr(context, builder, arrty, arr, idx, elem_ptr_type):
    """&arr[idx] (1-D, C-contiguous) bitcast to ``elem_ptr_type``."""
    ary = context.make_array(arrty)(context, builder, arr)
    p = builder.gep(ary.data, [idx])
    return builder.bitcast(p, elem_ptr_type)


def _float32_index(arrty, idxty) -> bool:
    """Whether ``arr[idx]`` names one float32 element: a tuple of arr.ndim ints, or one int (the
    index of a 1-D array, or the flat element index of a C-contiguous array of any ndim)."""
    if not isinstance(arrty, types.Array) or arrty.dtype != types.float32:
        return False
    if isinstance(idxty, types.Integer):
        return arrty.ndim == 1 or arrty.layout == "C"
    return (isinstance(idxty, types.UniTuple) and idxty.count == arrty.ndim
            and isinstance(idxty.dtype, types.Integer))


def _item_ptr(context, builder, arrty, arr, idxty, idx):
    """&arr[idx] (float*): no wraparound, no bounds check. A flat index into a C-contiguous
    array is one add, where the tuple's address multiplies by run-time strides: a kernel that
    computes ``(p * K + k) * PANEL + j`` itself gives LLVM the constant row stride."""
    ary = context.make_array(arrty)(context, builder, arr)
    if isinstance(idxty, types.Integer) and arrty.ndim > 1:
        return builder.gep(ary.data, [context.cast(builder, idx, idxty, types.intp)])
    if isinstance(idxty, types.Integer):
        inds = [context.cast(builder, idx, idxty, types.intp)]
    else:
        inds = [context.cast(builder, v, idxty.dtype, types.intp)
                for v in cgutils.unpack_tuple(builder, idx, idxty.count)]
    shape = cgutils.unpack_tuple(builder, ary.shape, arrty.ndim)
    strides = cgutils.unpack_tuple(builder, ary.strides, arrty.ndim)
    return cgutils.get_item_pointer2(context, builder, ary.data, shape, strides, arrty.layout, inds,
                                     wraparound=False, boundscheck=False)


def _splat(builder, value, vty):
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, undef, mask)


def _load(builder, ptr, align):
    v = builder.load(ptr)
    v.align = align
    return v


def _vec_ops(n):
    """Intrinsics on <n x i32> / <n x float> (n = 16: zmm, n = 8: ymm)."""
    VI = VecType(types.int32, n)
    VF = VecType(types.float32, n)
    li = ir.VectorType(_I32, n)
    lf = ir.VectorType(_F32, n)
    ops = {}

    @intrinsic
    def zero_i(typingctx):
        return VI(), lambda ctx, b, sig, args: ir.Constant(li, None)

    @intrinsic
    def zero_f(typingctx):
        return VF(), lambda ctx, b, sig, args: ir.Constant(lf, None)

    @intrinsic
    def load_i(typingctx, arr, i):
        """n int32 lanes from the 4n bytes at arr[i] (any 1-byte or 4-byte array)."""

        def cg(ctx, b, sig, args):
            return _load(b, _ptr(ctx, b, sig.args[0], args[0], args[1], li.as_pointer()), 1)

        return VI(arr, i), cg

    @intrinsic
    def bcast4(typingctx, arr, i):
        """The 4 bytes arr[i:i+4] as one int32, in every lane."""

        def cg(ctx, b, sig, args):
            v = _load(b, _ptr(ctx, b, sig.args[0], args[0], args[1], _I32.as_pointer()), 1)
            return _splat(b, v, li)

        return VI(arr, i), cg

    @intrinsic
    def dpbusd(typingctx, acc, a, w):
        """acc + sum over 4 byte pairs of u8(a) * s8(w), per int32 lane (vpdpbusd)."""
        name = "llvm.x86.avx512.vpdpbusd.512" if n == 16 else "llvm.x86.avx512.vpdpbusd.256"

        def cg(ctx, b, sig, args):
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(li, [li, li, li]), name)
            return b.call(fn, args)

        return VI(VI, VI, VI), cg

    @intrinsic
    def add_i(typingctx, a, c):
        return VI(VI, VI), lambda ctx, b, sig, args: b.add(args[0], args[1])

    @intrinsic
    def add_f(typingctx, a, c):
        return VF(VF, VF), lambda ctx, b, sig, args: b.fadd(args[0], args[1])

    @intrinsic
    def store_i(typingctx, arr, i, v):
        def cg(ctx, b, sig, args):
            st = b.store(args[2], _ptr(ctx, b, sig.args[0], args[0], args[1], li.as_pointer()))
            st.align = 4
            return ctx.get_dummy_value()

        return types.none(arr, i, VI), cg

    @intrinsic
    def store_f(typingctx, arr, i, v):
        def cg(ctx, b, sig, args):
            st = b.store(args[2], _ptr(ctx, b, sig.args[0], args[0], args[1], lf.as_pointer()))
            st.align = 4
            return ctx.get_dummy_value()

        return types.none(arr, i, VF), cg

    @intrinsic
    def bcast_f(typingctx, x):
        def cg(ctx, b, sig, args):
            return _splat(b, args[0], lf)

        return VF(types.float32), cg

    @intrinsic
    def bcast_ld_f(typingctx, arr, i):
        """arr[i] (float32) in every lane; a raw load, without Numba's negative-index wraparound
        (which costs four scalar instructions per use in these loops)."""

        def cg(ctx, b, sig, args):
            v = _load(b, _ptr(ctx, b, sig.args[0], args[0], args[1], _F32.as_pointer()), 4)
            return _splat(b, v, lf)

        return VF(arr, i), cg

    @intrinsic
    def fma_f(typingctx, a, x, c):
        """a * x + c, fused (llvm.fma)."""
        name = f"llvm.fma.v{n}f32"

        def cg(ctx, b, sig, args):
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(lf, [lf, lf, lf]), name)
            return b.call(fn, args)

        return VF(VF, VF, VF), cg

    @intrinsic
    def load_wf(typingctx, arr, i):
        """n weights at arr[i] -> n float32, the format told by the array's dtype: int8 values,
        uint16 IEEE half bit patterns (F16C vcvtph2ps) or int16 bfloat16 bit patterns (<< 16)."""
        dt = arr.dtype

        def cg(ctx, b, sig, args):
            if dt == types.int8:
                v = _load(b, _ptr(ctx, b, sig.args[0], args[0], args[1], ir.VectorType(_I8, n).as_pointer()), 1)
                return b.sitofp(b.sext(v, li), lf)
            v = _load(b, _ptr(ctx, b, sig.args[0], args[0], args[1], ir.VectorType(_I16, n).as_pointer()), 2)
            if dt == types.uint16:
                return b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), n)), lf)
            return b.bitcast(b.shl(b.zext(v, li), ir.Constant(li, [16] * n)), lf)

        if dt not in (types.int8, types.uint16, types.int16):
            return None
        return VF(arr, i), cg

    @intrinsic
    def dpbf16(typingctx, acc, a, w):
        """acc + a[2j] * w[2j] + a[2j+1] * w[2j+1] per float lane, a and w as int32 lanes that
        each hold two bfloat16 (vdpbf16ps)."""
        lb = ir.VectorType(_BFloat(), 2 * n)
        name = "llvm.x86.avx512bf16.dpbf16ps.512" if n == 16 else "llvm.x86.avx512bf16.dpbf16ps.256"

        def cg(ctx, b, sig, args):
            fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(lf, [lf, lb, lb]), name)
            return b.call(fn, [args[0], b.bitcast(args[1], lb), b.bitcast(args[2], lb)])

        return VF(VF, VI, VI), cg

    # Indexed float32 access: arr[idx] with idx a tuple of arr.ndim ints (the address from the
    # array's own shape or strides: any layout, the last axis contiguous) or one int (1-D, or
    # the flat element index of a C-contiguous array).
    @intrinsic
    def load_at(typingctx, arr, idx):
        """arr[idx : idx + n] along the last axis as n float32 lanes."""
        if not _float32_index(arr, idx):
            return None

        def cg(ctx, b, sig, args):
            p = _item_ptr(ctx, b, sig.args[0], args[0], sig.args[1], args[1])
            return _load(b, b.bitcast(p, lf.as_pointer()), 4)

        return VF(arr, idx), cg

    @intrinsic
    def store_at(typingctx, arr, idx, v):
        """arr[idx : idx + n] along the last axis <- the n lanes of v."""
        if not _float32_index(arr, idx):
            return None

        def cg(ctx, b, sig, args):
            p = _item_ptr(ctx, b, sig.args[0], args[0], sig.args[1], args[1])
            st = b.store(args[2], b.bitcast(p, lf.as_pointer()))
            st.align = 4
            return ctx.get_dummy_value()

        return types.none(arr, idx, VF), cg

    @intrinsic
    def bcast_at(typingctx, arr, idx):
        """arr[idx] (float32) in every lane."""
        if not _float32_index(arr, idx):
            return None

        def cg(ctx, b, sig, args):
            p = _item_ptr(ctx, b, sig.args[0], args[0], sig.args[1], args[1])
            return _splat(b, _load(b, p, 4), lf)

        return VF(arr, idx), cg

    @intrinsic
    def prefetch_l2_at(typingctx, arr, idx):
        """Prefetch the cache line of arr[idx] into L2 (``llvm.prefetch``, locality 2:
        ``prefetcht1``). A hint: it never faults, so idx may point past the array's end."""
        if not _float32_index(arr, idx):
            return None

        def cg(ctx, b, sig, args):
            p = b.bitcast(_item_ptr(ctx, b, sig.args[0], args[0], sig.args[1], args[1]), _I8.as_pointer())
            fn = cgutils.get_or_insert_function(
                b.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
            b.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
            return ctx.get_dummy_value()

        return types.none(arr, idx), cg

    for k, v in list(locals().items()):
        if k in ("zero_i", "zero_f", "load_i", "bcast4", "dpbusd", "add_i", "add_f", "store_i",
                 "store_f", "bcast_f", "bcast_ld_f", "fma_f", "load_wf", "dpbf16", "load_at",
                 "store_at", "bcast_at", "prefetch_l2_at"):
            ops[k] = v
    return ops


_V16 = _vec_ops(16)
_V8 = _vec_ops(8)

