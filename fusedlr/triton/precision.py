"""The low-precision modes' per-element helpers in Triton: ``fusedlr.precision``'s bit-level spec
(counter-based hash RNG, stochastic rounding to bfloat16, remainder split/join of an fp32 master)
plus rounding to nearest even, in ``uint32`` arithmetic (products wrap mod 2^32, shifts are logical).

Bit patterns are ``uint32`` (float32 bits), ``uint16`` (bfloat16 bits) and ``int16`` (remainders).
"""

import triton
import triton.language as tl

__all__ = ["hash32", "tensor_key", "random_bits", "round_nearest", "round_stochastic", "store_value",
           "split_master", "join_master"]


@triton.jit
def hash32(x):
    """Wellons' lowbias32 of ``uint32`` values (bijective)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _low_high(x):
    """The low and high 32 bits of the int64 ``x`` as ``uint32``."""
    return (x & 0xFFFFFFFF).to(tl.uint32), ((x >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def tensor_key(seed, param_id, step):
    """The ``uint32`` key of one tensor and step: ``seed``, ``param_id`` (its pid) and ``step`` int64 scalars."""
    t_lo, t_hi = _low_high(step)
    key = hash32(hash32(seed.to(tl.uint32)) ^ param_id.to(tl.uint32))
    return hash32(hash32(key ^ t_lo) ^ t_hi)


@triton.jit
def random_bits(key, STREAM: tl.constexpr, offs):
    """The 32 random bits (``uint32``) of the elements at int64 offsets ``offs`` of stored tensor ``STREAM``."""
    ka = hash32(key ^ STREAM)
    kb = hash32(ka ^ 0x9E3779B9)
    i_lo, i_hi = _low_high(offs)
    return hash32((hash32(i_lo ^ ka) ^ kb) + i_hi)


@triton.jit
def _bf16_of_bits(bits16):
    return bits16.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_nearest(x, DTYPE: tl.constexpr):
    """float32/float64 ``x`` in ``DTYPE``, rounded to nearest even.

    bfloat16 (from float32; float64 is first rounded to float32, as torch's CPU conversion does) is
    rounded with integer ops, so the interpreter, whose float32->bfloat16 cast truncates, rounds like
    the GPU and like torch; NaN becomes the canonical 0x7FC0.
    """
    if DTYPE == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        out = tl.where(x != x, 0x7FC0, (bits >> 16).to(tl.uint16))  # noqa: PLR0124 (NaN test)
        return out.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def round_stochastic(x, r):
    """float32/float64 ``x`` (float64 first rounded to nearest float32) stochastically rounded to
    bfloat16 with the random bits ``r`` (``uint32``); NaN is rounded to nearest (0x7FC0)."""
    x = x.to(tl.float32)
    bits = ((x.to(tl.uint32, bitcast=True) + (r >> 16)) >> 16).to(tl.uint16)
    return tl.where(x != x, 0x7FC0, bits).to(tl.bfloat16, bitcast=True)  # noqa: PLR0124 (NaN test)


@triton.jit
def store_value(x, key, STREAM: tl.constexpr, offs, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """``x`` as stored into a ``DTYPE`` tensor: stochastically rounded (random bits of ``STREAM``) into
    bfloat16 when ``STOCHASTIC``, else rounded to nearest (unchanged in its own dtype)."""
    if STOCHASTIC and DTYPE == tl.bfloat16:
        return round_stochastic(x, random_bits(key, STREAM, offs))
    else:
        return round_nearest(x, DTYPE)


@triton.jit
def split_master(x):
    """(bfloat16 param, int16 remainder) storing the float32 master ``x`` exactly (nearest, ties away)."""
    u = x.to(tl.uint32, bitcast=True)
    lo = u & 0xFFFF
    hi = (u >> 16) + (lo >= 0x8000).to(tl.uint32)
    nan = x != x  # noqa: PLR0124 (NaN test)
    hi = tl.where(nan, 0x7FC0, hi & 0xFFFF)
    lo = tl.where(nan, 0, lo)
    return _bf16_of_bits(hi), lo.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def join_master(param, remainder):
    """The float32 master stored as the bfloat16 ``param`` and the int16 ``remainder``."""
    hi = param.to(tl.uint16, bitcast=True).to(tl.uint32) - (remainder < 0).to(tl.uint32)
    lo = remainder.to(tl.uint16, bitcast=True).to(tl.uint32)
    return (((hi & 0xFFFF) << 16) | lo).to(tl.float32, bitcast=True)
