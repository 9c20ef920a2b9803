"""Triton twins of the few-bit backward activation ops, as ``torch.library.triton_op`` ops.

Ops (same signatures as the C++ schemas of csrc/schemas.cpp, so backend selection can pick
either; autograd is registered by _registration.load_triton):

    pypaper::fewbit_forward_triton(x, activation, params, borders, levels, bits, fold) -> (y, codes)
    pypaper::fewbit_backward_triton(grad, codes, levels, bits) -> grad_x

Novikov et al., "Few-Bit Backward: Quantized Gradients of Activation Functions for Memory
Footprint Reduction" (ICML 2023): keep only the b-bit index of the piece of a piecewise-constant
approximation q of f' that every x fell in, and multiply the incoming gradient by q's level.

Math (kernels/common/fewbit_pack.h; the plain-PyTorch spec is reference.py, matched bit for bit):

    y      = f(x)                               torch's own kernel (reference.activation)
    piece  = #{t : not x <= borders[t]}         x widened exactly to the math type (fp32; fp64
    code   = piece, or piece & 1 when fold      for fp64); NaN is above every border
    grad_x = (0 if levels[code] == 0 else grad.to(math) * levels[code]).to(grad.dtype)
                                                one multiply (or a select), one rounding

Packed layout of n codes of b bits: ceil(b*n/8) bytes in blocks of 32 elements. Block B (r = its
length: 32, or n - 32B for the last) starts at bit 32*b*B = byte 4*b*B of the stream, and bit k
of the code of its element j sits at bit k*r + j (stream bit i = bit i%8 of byte i//8). A full
block is therefore b little-endian uint32 words, word k = bit plane k of its 32 codes.

Kernels:
  pack (forward)  - a program owns BLOCKS full blocks as a [BLOCKS, 32] tile: code per element,
                    then per plane k one row reduction sum_j ((code_j >> k) & 1) << j (the bits are
                    disjoint, so the sum is the OR) stored as one uint32 word at word index
                    B*b + k. The last partial block (r < 32, at most 16 bytes) is one extra
                    program of the same launch, which builds its bytes directly from the stream
                    position formula.
  unpack (backward) - a program owns BLOCKS blocks ([BLOCKS, 32] elements); bit k of element j of
                    block B is bit (k*r + j) % 8 of byte 4*b*B + (k*r + j) // 8 - one formula for
                    full and partial blocks, so there is no tail path, and byte loads need no
                    alignment of the codes (a slice of a larger buffer works).

Exactness on the GPU: the compares are plain fcmp (setp without .ftz: Triton only links libdevice
with FTZ, plain arithmetic keeps subnormals), and the backward's multiply is the shared `_mul` of
pypaper/quant/triton_kernels.py (mul.rn in inline PTX: never contracted into an FMA, no FTZ).
Under the CPU interpreter numpy rounds every op on its own; bf16 travels as int16 bit patterns
and is widened / rounded by integer arithmetic (the interpreter's own bf16 conversion truncates).
"""

import torch

from . import reference, tables
from ..._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401

__all__ = ["HAVE_TRITON", "triton_available", "blocks_per_program", "num_warps_for"]


# Block of the layout, and the limits of kernels/common/fewbit_pack.h.
BLOCK = reference.BLOCK  # 32
MAX_BITS = 4
MAX_BORDERS = (1 << MAX_BITS) - 1
# The last partial block holds r <= 31 codes of b <= 4 bits: at most ceil(31 * 4 / 8) = 16 bytes.
_TAIL_BYTES = 16


# ---- launch heuristics (pure functions) ----------------------------------------------------------

# At most 128 blocks (4096 elements) per program: 16 KiB of fp32 x (or grad) per program keeps
# enough bytes in flight per SM for these memory-bound streams with 8 warps, the pack kernel's
# per-row reductions stay inside one warp (a row is 32 lanes), and the CPU interpreter runs few,
# large numpy programs.
_MAX_BLOCKS = 128


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def blocks_per_program(nblocks: int) -> int:
    """Blocks of 32 elements per program: the power of two covering ``nblocks``, capped at 128
    (small inputs get one small program instead of a mostly masked 4096-element tile)."""
    return max(1, min(_pow2(nblocks), _MAX_BLOCKS))


def num_warps_for(elements: int) -> int:
    """4 warps up to 2048 elements a tile (16 per thread), 8 above (16-32 per thread)."""
    return 4 if elements <= 2048 else 8


def _needs_int64(programs: int, blocks: int) -> bool:
    """int64 indices when an element index of the padded grid could pass int32. Byte and word
    indices stay below element indices (b <= 4 bits per element is at most half a byte)."""
    return programs * blocks * BLOCK + BLOCK >= 2**31


# ---- host-side checks (the messages of csrc/quant/fewbit_args.h) ---------------------------------

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _packed_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_bits(bits) -> int:
    """bits as a Python int (a SymInt under tracing is specialized: it is a kernel constexpr)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, torch.SymInt)) or \
            not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be 1, 2, 3 or 4, got {bits!r}")
    return int(bits)


def _check_activation(name: str, params) -> None:
    if name not in tables.PARAMS:
        raise ValueError(f"activation must be one of {', '.join(tables.PARAMS)}; got '{name}'")
    if len(params) != tables.PARAMS[name]:
        raise ValueError(f"activation '{name}' takes {tables.PARAMS[name]} params, got "
                         f"{len(params)}")


def _check_table(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    mt = _math_dtype(like.dtype)
    if t.dtype != mt:
        raise TypeError(f"{name} must be {mt} for {like.dtype} input, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")


def _check_levels(levels: torch.Tensor, like: torch.Tensor, bits: int) -> None:
    if levels.dim() != 1 or levels.numel() != (1 << bits):
        raise ValueError(f"levels must be a 1-D tensor of 2^bits = {1 << bits} values, got shape "
                         f"{tuple(levels.shape)}")
    _check_table(levels, "levels", like)


def _check_forward(x, activation, params, borders, levels, bits, fold) -> int:
    _check_float(x, "x")
    bits = _check_bits(bits)
    _check_activation(activation, params)
    if borders.dim() != 1 or not 1 <= borders.numel() <= MAX_BORDERS:
        raise ValueError(f"borders must be a 1-D tensor of 1..{MAX_BORDERS} values, got shape "
                         f"{tuple(borders.shape)}")
    _check_table(borders, "borders", x)
    if fold:
        if borders.numel() not in (2, 3):
            raise ValueError("fold=True needs 2 or 3 borders (an open interval, then +inf), got "
                             f"{borders.numel()}")
    elif borders.numel() + 1 > (1 << bits):
        raise ValueError(f"{borders.numel() + 1} pieces do not fit in {bits} bits")
    _check_levels(levels, x, bits)
    return bits


def _check_backward(grad, codes, levels, bits) -> int:
    _check_float(grad, "grad")
    bits = _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    want = _packed_bytes(grad.numel(), bits)
    if codes.dim() != 1 or codes.numel() != want:
        raise ValueError(f"codes must be a 1-D tensor of ceil(bits * grad.numel() / 8) = {want} "
                         f"bytes, got shape {tuple(codes.shape)}")
    if codes.device != grad.device:
        raise ValueError(f"codes must be on {grad.device}, got {codes.device}")
    _check_levels(levels, grad, bits)
    return bits


def _check_device(op: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        return
    ok, why = triton_available(t.device)
    if not ok:
        raise RuntimeError(f"pypaper::{op}: {why} (got tensors on {t.device})")


if triton is not None:
    from ..._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from ..._triton import triton_op  # torch.library's, plus its torch.func kernel

    # Device helpers shared with the quant kernels (one place for the exactness tricks):
    # _load_as / _store_as (bf16 as int16 bit patterns under the interpreter), _mul (mul.rn PTX on
    # NVIDIA), _launches (interpreted kernels never see fake / functional tensors), _bits.
    from ..._triton import _USE_RN, _bf16_bits, _bits, _launches, _load_as, _mul, _store_as

    @triton.jit
    def _code_of(x, borders_ptr, NB: tl.constexpr, FOLD: tl.constexpr):
        """uint32 code of x (math type): #{t : not x <= borders[t]} (NaN: all), its parity when
        FOLD. A static loop
        over the NB <= 15 borders, each one scalar load shared by the whole tile. (The count
        cannot overflow: sanitize_overflow=False spares the interpreter an int64 overflow check
        of every add.)"""
        piece = tl.zeros(x.shape, dtype=tl.uint32)
        for t in tl.static_range(NB):
            below = (x <= tl.load(borders_ptr + t)).to(tl.uint32)
            piece = tl.add(piece, below ^ 1, sanitize_overflow=False)
        if FOLD:
            piece = piece & 1
        return piece

    @triton.jit
    def _pack_full_blocks(x_ptr, borders_ptr, codes_ptr, pid, nfull, NB: tl.constexpr,
                          FOLD: tl.constexpr, BITS: tl.constexpr, BF16_BITS: tl.constexpr,
                          BLOCKS: tl.constexpr):
        """BLOCKS full blocks, one per row: plane word k of block B is the OR over lanes j of bit
        k of code j shifted to bit j."""
        mt = borders_ptr.dtype.element_ty
        blk = pid * BLOCKS + tl.arange(0, BLOCKS)
        lane = tl.arange(0, 32)
        e = blk[:, None] * 32 + lane[None, :]
        row_ok = blk < nfull
        x = _load_as(x_ptr + e, row_ok[:, None], mt, BF16_BITS)
        code = _code_of(x, borders_ptr, NB, FOLD)
        # Full blocks start at byte 4*b*B: the region is uint32 words, word index B*b + k (the
        # codes buffer is freshly allocated, so 4-byte aligned).
        words = codes_ptr.to(tl.pointer_type(tl.int32))
        for k in tl.static_range(BITS):
            w = tl.sum(((code >> k) & 1) << lane.to(tl.uint32)[None, :], axis=1)
            tl.store(words + blk * BITS + k, w.to(tl.int32, bitcast=True), mask=row_ok)

    @triton.jit
    def _pack_tail(x_ptr, borders_ptr, codes_ptr, tail_start, tail_byte, r, NB: tl.constexpr,
                   FOLD: tl.constexpr, BITS: tl.constexpr, BF16_BITS: tl.constexpr,
                   TAIL_BYTES: tl.constexpr):
        """The partial block: r = n - 32*nfull codes (1..31) from element tail_start = 32*nfull,
        whose bits start at byte tail_byte = 4*b*nfull (both from the host, so int64 when large).
        Stream bit s = 8*t + q of it (byte t, bit q) is bit k = s // r of element j = s % r, for
        s < b*r; the rest of the last byte is 0."""
        mt = borders_ptr.dtype.element_ty
        t = tl.arange(0, TAIL_BYTES)
        s = t[:, None] * 8 + tl.arange(0, 8)[None, :]
        valid = s < BITS * r
        k = tl.minimum(s // r, BITS - 1)  # clamped: no out-of-range shifts on masked lanes
        j = s - (s // r) * r
        x = _load_as(x_ptr + tail_start + j, valid, mt, BF16_BITS)
        code = _code_of(x, borders_ptr, NB, FOLD)
        bit = tl.where(valid, (code >> k.to(tl.uint32)) & 1, 0)
        byte = tl.sum(bit << tl.arange(0, 8).to(tl.uint32)[None, :], axis=1)
        tl.store(codes_ptr + tail_byte + t, byte.to(tl.uint8), mask=t * 8 < BITS * r)

    @triton.jit
    def _fewbit_pack_kernel(x_ptr, borders_ptr, codes_ptr, nfull, full_programs, tail_start,
                            tail_byte, r,
                            NB: tl.constexpr, FOLD: tl.constexpr, BITS: tl.constexpr,
                            IDX64: tl.constexpr, BF16_BITS: tl.constexpr,
                            BLOCKS: tl.constexpr, TAIL_BYTES: tl.constexpr):
        # The two cases are functions of their own: compiled Triton requires a name assigned in
        # both branches of a runtime `if` to have one type, and the two cases' tiles differ in
        # shape (the interpreter does not check this; tools/triton_compile_check.py does).
        pid = tl.program_id(0)
        if IDX64:
            pid = pid.to(tl.int64)
        if pid < full_programs:
            _pack_full_blocks(x_ptr, borders_ptr, codes_ptr, pid, nfull, NB, FOLD, BITS,
                              BF16_BITS, BLOCKS)
        else:
            _pack_tail(x_ptr, borders_ptr, codes_ptr, tail_start, tail_byte, r, NB, FOLD, BITS,
                       BF16_BITS, TAIL_BYTES)

    @triton.jit
    def _fewbit_unpack_kernel(grad_ptr, codes_ptr, levels_ptr, out_ptr, n,
                              BITS: tl.constexpr, IDX64: tl.constexpr, USE_RN: tl.constexpr,
                              BF16_BITS: tl.constexpr, BLOCKS: tl.constexpr):
        pid = tl.program_id(0)
        if IDX64:
            pid = pid.to(tl.int64)
        blk = pid * BLOCKS + tl.arange(0, BLOCKS)
        lane = tl.arange(0, 32)
        e = blk[:, None] * 32 + lane[None, :]
        mask = e < n
        # r = length of each row's block (32, or the tail's); bit k of lane j sits at local stream
        # bit k*r + j from the block's first byte 4*b*B. For r = 32 this is byte 4*(b*B + k) +
        # j // 8: plane word k, little-endian.
        r = tl.minimum(n - blk * 32, 32).to(tl.int32)
        base = blk * (4 * BITS)
        code = tl.zeros([BLOCKS, 32], dtype=tl.int32)
        for k in tl.static_range(BITS):
            local = k * r[:, None] + lane[None, :]
            byte = tl.load(codes_ptr + base[:, None] + (local >> 3), mask=mask, other=0)
            code |= ((byte.to(tl.int32) >> (local & 7)) & 1) << k
        lv = tl.load(levels_ptr + code, mask=mask, other=0.0)
        g = _load_as(grad_ptr + e, mask, lv.dtype, BF16_BITS)
        # level 0 gives 0 whatever grad is (a select, as torch's ReLU backward)
        gx = tl.where(lv == 0, tl.zeros_like(lv), _mul(g, lv, USE_RN))
        _store_as(out_ptr + e, gx, mask, BF16_BITS)

    # Interpreted (TRITON_INTERPRET=1 at import) or compiled.

    # ---- ops -------------------------------------------------------------------------------------

    @triton_op("pypaper::fewbit_forward_triton", mutates_args=())
    def fewbit_forward_triton(x: torch.Tensor, activation: str, params: list[float],
                              borders: torch.Tensor, levels: torch.Tensor, bits: int,
                              fold: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, codes): y = f(x) with torch's kernel (bit-exact), codes = the packed b-bit piece
        index of every element of x under ``borders`` (its parity when ``fold``); ``levels`` is
        only checked here, autograd saves it for the backward."""
        _check_device("fewbit_forward_triton", x)
        bits = _check_forward(x, activation, params, borders, levels, bits, fold)
        x = x.contiguous()
        borders = borders.contiguous()
        y = reference.activation(x, activation, params).contiguous()
        n = x.numel()
        codes = torch.empty(_packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
        if n == 0 or not _launches(x):
            return y, codes
        nfull = n // BLOCK
        blocks = blocks_per_program(nfull)
        full_programs = -(-nfull // blocks)
        r = n - nfull * BLOCK  # the partial block's length, 0 when there is none
        wrap_triton(_fewbit_pack_kernel)[(full_programs + (r > 0),)](
            _bits(x), borders, codes, nfull, full_programs, nfull * BLOCK,
            nfull * BLOCK * bits // 8, r, NB=borders.numel(), FOLD=fold,
            BITS=bits, IDX64=_needs_int64(full_programs + 1, blocks),
            BF16_BITS=_bf16_bits(x.dtype), BLOCKS=blocks, TAIL_BYTES=_TAIL_BYTES,
            num_warps=num_warps_for(blocks * BLOCK))
        return y, codes

    @triton_op("pypaper::fewbit_backward_triton", mutates_args=())
    def fewbit_backward_triton(grad: torch.Tensor, codes: torch.Tensor, levels: torch.Tensor,
                               bits: int) -> torch.Tensor:
        """grad_x = levels[code] * grad (0 where the level is 0): math in levels' dtype (fp32, fp64 for fp64), rounded
        once to grad's dtype."""
        _check_device("fewbit_backward_triton", grad)
        bits = _check_backward(grad, codes, levels, bits)
        grad = grad.contiguous()
        codes = codes.contiguous()
        levels = levels.contiguous()
        gx = torch.empty_like(grad, memory_format=torch.contiguous_format)
        n = grad.numel()
        if n == 0 or not _launches(grad):
            return gx
        nblocks = -(-n // BLOCK)
        blocks = blocks_per_program(nblocks)
        programs = -(-nblocks // blocks)
        wrap_triton(_fewbit_unpack_kernel)[(programs,)](
            _bits(grad), codes, levels, _bits(gx), n, BITS=bits,
            IDX64=_needs_int64(programs, blocks), USE_RN=_USE_RN,
            BF16_BITS=_bf16_bits(grad.dtype), BLOCKS=blocks,
            num_warps=num_warps_for(blocks * BLOCK))
        return gx

    __all__ += ["fewbit_forward_triton", "fewbit_backward_triton"]
