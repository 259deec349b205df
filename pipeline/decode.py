"""Byte-offset decoding on the CPU (numba), equal to fabio bit for bit.

The byte-offset scheme stores the difference to the previous pixel in one
byte; -128 escapes to a 16-bit delta, -32768 to a 32-bit delta and
-2147483648 to a 64-bit one (all little endian).  The loop is compiled with
``nogil`` so that several reader threads decode different frames at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cbf import CbfFrame, CorruptCbfError, element_dtype

#: status codes returned by the compiled kernels
OK, TOO_MANY, TRUNCATED_ESCAPE = 0, 1, 2


@njit(nogil=True, cache=True, inline="always")
def _next_delta(src, pos, end):
    """Return (delta, new position, status) of the token starting at ``pos``."""
    b = np.int64(np.int8(src[pos]))
    if b != -128:
        return b, pos + 1, OK
    if pos + 3 > end:
        return np.int64(0), end, TRUNCATED_ESCAPE
    d16 = np.int64(np.int16(np.uint16(src[pos + 1]) | (np.uint16(src[pos + 2]) << np.uint16(8))))
    if d16 != -32768:
        return d16, pos + 3, OK
    if pos + 7 > end:
        return np.int64(0), end, TRUNCATED_ESCAPE
    u32 = (np.uint32(src[pos + 3]) | (np.uint32(src[pos + 4]) << np.uint32(8))
           | (np.uint32(src[pos + 5]) << np.uint32(16)) | (np.uint32(src[pos + 6]) << np.uint32(24)))
    d32 = np.int64(np.int32(u32))
    if d32 != -2147483648:
        return d32, pos + 7, OK
    if pos + 15 > end:
        return np.int64(0), end, TRUNCATED_ESCAPE
    u64 = np.uint64(0)
    for k in range(8):
        u64 |= np.uint64(src[pos + 7 + k]) << np.uint64(8 * k)
    return np.int64(u64), pos + 15, OK


@njit(nogil=True, cache=True)
def decode_into(src, out):
    """Decode ``src`` (uint8) into ``out`` (int32).  Returns (values, bytes used, status)."""
    n_out = out.shape[0]
    end = src.shape[0]
    pos = 0
    count = 0
    current = np.int64(0)
    while pos < end:
        delta, pos, status = _next_delta(src, pos, end)
        if status != OK:
            return count, pos, status
        if count >= n_out:
            return count, pos, TOO_MANY
        current += delta
        out[count] = np.int32(current)  # wraps like fabio's int32 cast
        count += 1
    return count, pos, OK


def check_status(count: int, n_expected: int, status: int) -> None:
    """Turn a kernel status into a clear error."""
    if status == TRUNCATED_ESCAPE:
        raise CorruptCbfError("byte-offset stream ends inside an escape sequence")
    if status == TOO_MANY:
        raise CorruptCbfError(f"byte-offset stream holds more than the {n_expected} announced values")
    if count != n_expected:
        raise CorruptCbfError(f"byte-offset stream decodes to {count} values, header announces {n_expected}")


def decode(frame: CbfFrame, out: np.ndarray | None = None) -> np.ndarray:
    """Decode a frame into a 2D array of the announced element type."""
    n = frame.header.n_elements
    buf = out if out is not None else np.empty(n, dtype=np.int32)
    src = np.frombuffer(frame.raw, dtype=np.uint8)
    count, _, status = decode_into(src, buf.reshape(-1))
    check_status(count, n, status)
    dtype = element_dtype(frame.header)
    result = buf.reshape(frame.shape)
    return result if dtype == np.int32 else result.astype(dtype)
