"""Exactly rounded sums: the one definition of `sum` and `mean` for every window, online and
offline, so a window's sum never depends on the order its events arrived in.

A superaccumulator holds a running sum of doubles exactly, as signed 32-bit digits (kept in
int64, so carries wait) in units of 2**-1074, the smallest subnormal: adding or removing a value
is exact, and `total` gives the exact sum rounded once to the nearest double (ties to even,
±inf beyond the largest double), as `math.fsum` would but without its intermediate overflow;
`mean` the exact sum divided by the count, rounded once too.
An exact zero is +0.0. NaN values are left out; infinities are counted apart, so they leave a
window cleanly: +inf gives +inf, -inf -inf, both NaN, and no value at all NaN.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

DIGITS = 67
"""32-bit digits: 66 cover every double (2**-1074 .. 2**1024), one more absorbs carries."""
_COUNT, _LO, _HI, _VALID, _POS_INF, _NEG_INF = range(DIGITS, DIGITS + 6)
_MASK = 0xFFFFFFFF
_UNIT = -1074  # a digit's lowest bit is 2**_UNIT, the smallest subnormal
_LONG_DIVISOR = 1 << 31  # _long_mean divides digit by digit while n * 2**32 fits an int64
_FLUSH_AFTER = 1 << 30


@njit(nogil=True, cache=True)
def new_accumulator() -> np.ndarray:
    """An empty accumulator: DIGITS digits, then the additions since carries last ran, the
    lowest and highest digit in use (so rounding reads only those) and the counts of values,
    +inf and -inf."""
    acc = np.zeros(DIGITS + 6, np.int64)
    clear(acc)
    return acc


@njit(nogil=True, cache=True)
def new_scratch() -> np.ndarray:
    """Working space for `total` and `mean`, reusable across calls."""
    return np.zeros(DIGITS + 3, np.int64)


@njit(nogil=True, cache=True)
def clear(acc: np.ndarray) -> None:
    """Set an accumulator back to 0."""
    for k in range(acc[_LO] if acc[_HI] >= 0 else 0, acc[_HI] + 1):
        acc[k] = 0
    acc[_COUNT] = 0
    acc[_LO] = DIGITS
    acc[_HI] = -1
    acc[_VALID] = acc[_POS_INF] = acc[_NEG_INF] = 0


@njit(nogil=True, cache=True)
def _carry(acc: np.ndarray) -> None:
    """Bring the digits in use into [0, 2**32) but the top one, which keeps the sign; same value."""
    carry = 0
    for k in range(acc[_LO], DIGITS - 1):
        x = acc[k] + carry
        carry = x >> 32
        acc[k] = x & _MASK
    acc[DIGITS - 1] += carry
    acc[_COUNT] = 0
    acc[_HI] = DIGITS - 1


@njit(nogil=True, cache=True)
def add(acc: np.ndarray, v: float) -> None:
    """Add a value to the sum (NaN is left out)."""
    _count(acc, v, 1)


@njit(nogil=True, cache=True)
def remove(acc: np.ndarray, v: float) -> None:
    """Take back a value added before (NaN is left out)."""
    _count(acc, v, -1)


@njit(nogil=True, cache=True)
def count(acc: np.ndarray) -> int:
    """How many values (not NaN) the sum holds."""
    return acc[_VALID]


@njit(nogil=True, cache=True)
def _count(acc: np.ndarray, v: float, sign: int) -> None:
    if math.isnan(v):
        return
    acc[_VALID] += sign
    if v == math.inf:
        acc[_POS_INF] += sign
    elif v == -math.inf:
        acc[_NEG_INF] += sign
    else:
        _add_finite(acc, v if sign > 0 else -v)


@njit(nogil=True, cache=True)
def _add_finite(acc: np.ndarray, v: float) -> None:
    """Add a finite double exactly."""
    if v == 0.0:
        return
    frac, exp = math.frexp(v)
    m = np.uint64(abs(frac) * 9007199254740992.0)  # 2**53: exact, frac has 53 bits
    p = exp + 1021  # v = ±m * 2**(exp - 53) = ±m units of 2**-1074 shifted left by p
    if p < 0:
        m >>= np.uint64(-p)
        p = 0
    k = p >> 5
    s = np.uint64(p & 31)
    low = np.int64((m << s) & np.uint64(_MASK))
    rest = (m >> (np.uint64(32) - s)) if s else (m >> np.uint64(32))
    mid = np.int64(rest & np.uint64(_MASK))
    high = np.int64(rest >> np.uint64(32))
    if v < 0.0:
        acc[k] -= low
        acc[k + 1] -= mid
        acc[k + 2] -= high
    else:
        acc[k] += low
        acc[k + 1] += mid
        acc[k + 2] += high
    if k < acc[_LO]:
        acc[_LO] = k
    if k + 2 > acc[_HI]:
        acc[_HI] = k + 2
    acc[_COUNT] += 1
    if acc[_COUNT] >= _FLUSH_AFTER:
        _carry(acc)


@njit(nogil=True, cache=True)
def _bits(digits: np.ndarray, lo_digit: int, lo: int, n: int) -> np.uint64:
    """Bits lo .. lo+n-1 (n <= 63) of a non-negative carried number whose digits below lo_digit
    are 0, as an integer."""
    out = np.uint64(0)
    for k in range(max(lo >> 5, lo_digit), ((lo + n - 1) >> 5) + 1):
        digit = np.uint64(digits[k])
        shift = 32 * k - lo
        if shift >= 0:
            out |= digit << np.uint64(shift)
        else:
            out |= digit >> np.uint64(-shift)
    return out & ((np.uint64(1) << np.uint64(n)) - np.uint64(1))


@njit(nogil=True, cache=True)
def total(acc: np.ndarray, scratch: np.ndarray) -> float:
    """The sum: finite values' exact sum rounded once, unless infinities or no values decide it
    (module docstring). scratch: new_scratch()."""
    if acc[_VALID] == 0 or (acc[_POS_INF] and acc[_NEG_INF]):
        return math.nan
    if acc[_POS_INF]:
        return math.inf
    if acc[_NEG_INF]:
        return -math.inf
    return _rounded(acc, scratch)


@njit(nogil=True, cache=True)
def mean(acc: np.ndarray, scratch: np.ndarray) -> float:
    """The mean: the finite values' exact sum divided by the number of values, rounded once
    (so the mean of 1e308 and 1e308 is 1e308, though their sum is inf), unless infinities or no
    values decide it as they decide the sum."""
    return sum_and_mean(acc, scratch)[1]


@njit(nogil=True, cache=True)
def sum_and_mean(acc: np.ndarray, scratch: np.ndarray):
    """(total, mean) in one pass over the digits. Over 2**31 values the mean is the rounded
    sum over their number (rounded twice)."""
    n = acc[_VALID]
    if n == 0 or acc[_POS_INF] or acc[_NEG_INF]:
        s = total(acc, scratch)
        return s, (s / n if n else math.nan)
    lo, top, negative = _magnitude(acc, scratch)
    if top < lo:
        return 0.0, 0.0
    s, inexact = _round(scratch, lo, top, _UNIT, False, negative)
    if not inexact or n >= _LONG_DIVISOR:
        return s, s / n  # an exact sum: IEEE division rounds the mean once
    return s, _long_mean(scratch, lo, top, n, negative)


@njit(nogil=True, cache=True)
def _long_mean(digits: np.ndarray, lo: int, top: int, n: int, negative: bool) -> float:
    """±digits[lo..top] * 2**_UNIT / n rounded once: 64 more bits below the unit, then long
    division by n, digit by digit from the top (n * 2**32 fits an int64)."""
    for k in range(top, lo - 1, -1):
        digits[k + 2] = digits[k]
    digits[lo] = 0
    digits[lo + 1] = 0
    top += 2
    rest = 0
    for k in range(top, lo - 1, -1):
        current = (rest << 32) | digits[k]
        digits[k] = current // n
        rest = current - digits[k] * n
    while top > lo and digits[top] == 0:  # the quotient is >= 2**64 / n > 0: never all 0
        top -= 1
    return _round(digits, lo, top, _UNIT - 64, rest != 0, negative)[0]


@njit(nogil=True, cache=True)
def _rounded(acc: np.ndarray, scratch: np.ndarray) -> float:
    """The finite values' exact sum rounded to the nearest double."""
    lo, top, negative = _magnitude(acc, scratch)
    if top < lo:
        return 0.0
    return _round(scratch, lo, top, _UNIT, False, negative)[0]


@njit(nogil=True, cache=True)
def _magnitude(acc: np.ndarray, scratch: np.ndarray):
    """The finite values' exact sum as its sign and its magnitude's digits in scratch, each in
    [0, 2**32): (lowest digit, highest non-zero digit (below the lowest when 0), negative)."""
    lo, top = acc[_LO], acc[_HI]
    if top < 0:
        return 0, -1, False
    carry = 0
    for k in range(lo, top):
        x = acc[k] + carry
        carry = x >> 32
        scratch[k] = x & _MASK
    scratch[top] = acc[top] + carry
    negative = scratch[top] < 0
    if negative:
        carry = 0
        for k in range(lo, top):
            x = carry - scratch[k]
            carry = x >> 32
            scratch[k] = x & _MASK
        scratch[top] = carry - scratch[top]
    scratch[top + 1] = scratch[top] >> 32
    scratch[top] &= _MASK
    top += 1
    while top >= lo and scratch[top] == 0:
        top -= 1
    return lo, top, negative


@njit(nogil=True, cache=True)
def _round(digits: np.ndarray, lo: int, top: int, unit: int, sticky: bool, negative: bool):
    """±(digits[lo..top] in base 2**32) * 2**unit, plus a little more when sticky, rounded to
    the nearest double, ties to even (53 bits for a normal result, down to 2**-1074 below),
    and whether that rounding changed the value."""
    high = 32 * top + math.frexp(float(digits[top]))[1] - 1  # exact: the digit is < 2**32
    if high + unit >= 1024:
        return (-math.inf if negative else math.inf), True
    keep = max(high - 52, _UNIT - unit)  # the lowest bit kept
    if keep <= 0:
        value = math.ldexp(float(_bits(digits, lo, 0, high + 1)), unit)
        return (-value if negative else value), sticky
    mantissa = _bits(digits, lo, keep, high - keep + 1)
    round_bit = _bits(digits, lo, keep - 1, 1) != 0
    below = keep - 1
    k = below >> 5
    sticky = sticky or (k >= lo and (digits[k] & ((1 << (below & 31)) - 1)) != 0)
    k -= 1
    while not sticky and k >= lo:
        sticky = digits[k] != 0
        k -= 1
    if round_bit and (sticky or (mantissa & np.uint64(1))):
        mantissa += np.uint64(1)
    value = math.ldexp(float(mantissa), keep + unit)
    return (-value if negative else value), round_bit or sticky


@njit(nogil=True, cache=True)
def segment_sums_and_means(values: np.ndarray, offsets: np.ndarray):
    """(sums, means): `total` and `mean` of values[offsets[i]:offsets[i+1]] for each segment i."""
    n = offsets.shape[0] - 1
    sums = np.empty(max(n, 0), np.float64)
    means = np.empty(max(n, 0), np.float64)
    acc = new_accumulator()
    scratch = new_scratch()
    for i in range(n):
        clear(acc)
        for j in range(offsets[i], offsets[i + 1]):
            add(acc, values[j])
        sums[i], means[i] = sum_and_mean(acc, scratch)
    return sums, means
