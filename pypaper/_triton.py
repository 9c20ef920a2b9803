"""Triton, once for every family: the guarded import, the availability check, and the device
helpers whose rounding must match the C++ kernels to the bit.

Each family's ``triton_kernels.py`` imports from here (it is itself imported on first use:
importing triton takes seconds). Under ``TRITON_INTERPRET=1`` (set before the first import) the
kernels run on CPU tensors through Triton's numpy interpreter, which is how they are tested on
machines without a GPU.

Device math (compiled for NVIDIA, ``USE_RN``): the ops whose rounding matters are single PTX
instructions in inline asm, because Triton contracts a*b+c into an FMA and links libdevice with
fp32 subnormals flushed to zero. The interpreter runs numpy, which rounds every op on its own and
keeps subnormals. bf16 travels as int16 bit patterns under the interpreter, whose own bf16
conversions truncate (``_load_as`` / ``_store_as`` widen and round them exactly).
"""
import os

import torch

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = ""
except ImportError:
    triton = tl = None
    TRITON_ERROR = "triton is not installed"
except Exception as _e:  # a broken install
    triton = tl = None
    TRITON_ERROR = f"triton failed to import ({type(_e).__name__}: {_e})"

HAVE_TRITON = triton is not None

_NO_DEVICE = "triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"


def triton_op(name: str, fn=None, /, *, mutates_args, schema=None):
    """torch.library.triton_op, and the op's torch.func kernel (pypaper/_autograd.py): the
    Autograd kernel a triton_op is born with fails under every torch.func transform."""
    from . import _autograd

    def define(f):
        opdef = torch.library.triton_op(name, mutates_args=mutates_args, schema=schema)(f)
        _autograd.register_functorch(name)
        return opdef

    return define(fn) if fn is not None else define


def triton_available(device: torch.device) -> tuple[bool, str]:
    """(True, "") when pypaper's Triton ops can run on tensors of ``device``, else (False, why)."""
    if triton is None:
        return False, TRITON_ERROR
    dev = torch.device(device)
    if dev.type == "cuda":
        return True, ""
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if not _INTERPRETED:
            return False, ("TRITON_INTERPRET=1 was set after pypaper's Triton kernels were "
                           "imported; set it before importing pypaper")
        return True, ""
    return False, _NO_DEVICE


if triton is not None:
    # ---- device math (shared) -----------------------------------------------------------------------------
    # USE_RN (compiled for NVIDIA): the ops whose rounding matters are single PTX instructions in
    # inline asm: no FMA contraction of a*b+c (Triton enables FP fusion) and no flush of
    # subnormals (libdevice and tl.floor are linked with FTZ for fp32). The CPU interpreter runs
    # numpy, which rounds every op on its own and keeps subnormals; rint is built from floor.

    @triton.jit
    def _ptx1(v, OP: tl.constexpr):
        """cvt.<OP> (rni: round half even, rmi: floor), correctly rounded, no FTZ."""
        if v.dtype == tl.float64:
            return tl.inline_asm_elementwise("cvt." + OP + ".f64.f64 $0, $1;", "=d,d", [v],
                                             dtype=tl.float64, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("cvt." + OP + ".f32.f32 $0, $1;", "=f,f", [v],
                                             dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _ptx2(a, b, OP: tl.constexpr):
        """<OP>.rn (mul, add): one IEEE rounding, no FTZ, never fused."""
        if a.dtype == tl.float64:
            return tl.inline_asm_elementwise(OP + ".rn.f64 $0, $1, $2;", "=d,d,d", [a, b],
                                             dtype=tl.float64, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(OP + ".rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                             dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _mul(a, b, USE_RN: tl.constexpr):
        if USE_RN:
            return _ptx2(a, b, "mul")
        else:
            return a * b

    @triton.jit
    def _add(a, b, USE_RN: tl.constexpr):
        if USE_RN:
            return _ptx2(a, b, "add")
        else:
            return a + b

    @triton.jit
    def _floor(v, USE_RN: tl.constexpr):
        if USE_RN:
            return _ptx1(v, "rmi")
        else:
            return tl.floor(v)

    @triton.jit
    def _rint(v, USE_RN: tl.constexpr):
        """Round half to even (torch.round), exact for every float."""
        if USE_RN:
            return _ptx1(v, "rni")
        else:
            f = tl.floor(v)
            d = v - f  # the fraction of a float is exact
            odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
            r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
            return tl.where(r == 0.0, v * 0.0, r)  # keep rint's signed zero

    @triton.jit
    def _load_as(ptrs, mask, dtype, BF16_BITS: tl.constexpr):
        """Load and convert to the math type. BF16_BITS: ptrs hold bf16 bit patterns as int16
        (CPU interpreter, whose own bf16 conversions truncate); widen them exactly."""
        if BF16_BITS:
            b = tl.load(ptrs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            return (b << 16).to(tl.float32, bitcast=True).to(dtype)
        else:
            return tl.load(ptrs, mask=mask, other=0.0).to(dtype)

    @triton.jit
    def _store_as(ptrs, v, mask, BF16_BITS: tl.constexpr):
        """Cast to the pointer's type (round to nearest even) and store. BF16_BITS: fp32 -> bf16
        bits by integer rounding, as c10::BFloat16 does (NaN -> 0x7FC0)."""
        if BF16_BITS:
            b = v.to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(v != v, 0x7FC0, r)
            tl.store(ptrs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _pcg(v):
        """PCG-RXS-M-XS hash of uint32 (kernels/common/hash_rng.h), wrapping uint32 arithmetic."""
        state = v * tl.full([], 747796405, tl.uint32) + tl.full([], 2891336453, tl.uint32)
        word = ((state >> ((state >> 28) + 4)) ^ state) * tl.full([], 277803737, tl.uint32)
        return (word >> 22) ^ word

    @triton.jit
    def _uniform(seed_ptr, e, IDX64: tl.constexpr):
        """u in [0, 1) of flat index e: reference.uniform_noise / rng::uniform01, bit for bit."""
        sd = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
        ka = _pcg(sd.to(tl.uint32))
        kb = _pcg((sd >> 32).to(tl.uint32) ^ _pcg(ka))  # kernels/common/hash_rng.h
        if IDX64:
            lo = e.to(tl.uint32)
            hi = (e >> 32).to(tl.uint32)
            h = _pcg(_pcg(lo ^ ka) ^ (hi + kb))
        else:
            h = _pcg(_pcg(e.to(tl.uint32) ^ ka) ^ kb)
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)

    # Interpreted (TRITON_INTERPRET=1 when triton.jit ran) or compiled; the PTX path only for
    # NVIDIA (on ROCm the plain ops run, exact up to FMA contraction).
    _INTERPRETED = type(_pcg).__name__ == "InterpretedFunction"
    _USE_RN = not _INTERPRETED and torch.version.hip is None

    def _launches(t: torch.Tensor) -> bool:
        """Whether to run the kernels on ``t``. Compiled kernels always go through wrap_triton,
        which records them on fake tensors. Interpreted ones cannot be traced: on fake or meta
        tensors the op only allocates (it then serves as its own fake kernel), and functional
        tracing (torch.compile, export) raises instead of dropping the kernel from the graph."""
        if t.device.type == "meta":
            return False
        if not _INTERPRETED:
            return True
        from torch._subclasses.fake_tensor import is_fake
        from torch._subclasses.functional_tensor import FunctionalTensor

        if isinstance(t, FunctionalTensor) or torch._is_functional_tensor(t):
            raise RuntimeError("pypaper Triton ops run eagerly only under TRITON_INTERPRET=1: "
                               "torch.compile / export tracing needs compiled Triton kernels")
        return not is_fake(t)

    def wrap_triton(kernel):
        """torch.library.wrap_triton for a compiled kernel (so torch.compile and export see the
        launch), launched on its tensors' device (_OnTensorsDevice); an interpreted one
        (TRITON_INTERPRET=1) is launched as it is: it never reaches tracing (_launches), and
        torch 2.11's wrap_triton refuses it ("wrap_triton only works on functions annotated with
        triton.jit or triton.autotune"), where later versions pass it."""
        if _INTERPRETED:
            return kernel
        return _OnTensorsDevice(torch.library.wrap_triton(kernel))


def _cuda_device_of(args) -> "torch.device | None":
    """The device of the first CUDA tensor among a launch's arguments, else None."""
    for a in args:
        dev = getattr(a, "device", None)
        if isinstance(dev, torch.device) and dev.type == "cuda":
            return dev
    return None


class _OnTensorsDevice:
    """``kernel[grid](*args)`` run with its tensors' CUDA device made current.

    Triton launches on the *current* CUDA device and that device's current stream, whatever
    device the pointers belong to (triton/runtime/jit.py asks the driver for the current device).
    A layer moved with ``.to("cuda:1")`` while cuda:0 is current (no torch.cuda.set_device: the
    usual single-process way to use a second GPU) had its kernel run on cuda:0 over cuda:1's
    memory: Triton's "Pointer argument cannot be accessed", an illegal address, or with peer
    access on, a kernel unordered with the cuda:1 work that wrote its input. Ops written in C++
    hold a CUDAGuard for this (csrc/snn/snn_cuda.cpp); a Python op registered with
    torch.library gets no device guard from the dispatcher, so every family's launches take it
    here. Under torch.compile the launch is traced (fake tensors: the switch is harmless) and
    inductor's generated code guards the device of its own graph."""

    def __init__(self, launcher):
        self._launcher = launcher

    def __getitem__(self, grid):
        run = self._launcher[grid]

        def launch(*args, **kwargs):
            dev = _cuda_device_of(args)
            if dev is None or dev.index is None or dev.index == torch.cuda.current_device():
                return run(*args, **kwargs)
            with torch.cuda.device(dev):
                return run(*args, **kwargs)

        return launch


if triton is not None:

    def _bf16_bits(dtype: torch.dtype) -> bool:
        return _INTERPRETED and dtype == torch.bfloat16

    def _bits(t: torch.Tensor) -> torch.Tensor:
        """bf16 tensors travel as int16 bit patterns under the interpreter (see _load_as)."""
        return t.view(torch.int16) if _bf16_bits(t.dtype) else t

else:
    _INTERPRETED = False
    _USE_RN = False
