"""Read a run of files with a single release of the GIL.

At thousands of files a second, each ``open``/``fstat``/``readinto``/``close`` from Python gives the GIL
up and must win it back, and under load every win can wait for another thread's time slice.  Here a
compiled function (numba, ``nogil``) calls libc's open/lseek/pread/close itself, so a reader thread
takes the GIL once per run of files.  Where libc cannot be reached this way, plain Python I/O is used.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a frame swapped for a link after listing fails (ELOOP)

try:
    from numba import njit

    _libc = ctypes.CDLL(None)
    _open = _libc.open
    _open.argtypes, _open.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    _pread = _libc.pread
    _pread.argtypes, _pread.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long], ctypes.c_ssize_t
    _lseek = _libc.lseek
    _lseek.argtypes, _lseek.restype = [ctypes.c_int, ctypes.c_long, ctypes.c_int], ctypes.c_long
    _close = _libc.close
    _close.argtypes, _close.restype = [ctypes.c_int], ctypes.c_int

    @njit(nogil=True)
    def _read_packed(names, starts, buf, align, offsets, got, sizes):
        """Read files one after another into ``buf`` (each at an ``align``-ed offset), all without the GIL.

        Per file: ``got`` bytes read (-1 cannot be opened, -2 does not fit in what is left of ``buf``).
        """
        pos = 0
        for k in range(starts.shape[0]):
            fd = _open(names[starts[k]:].ctypes.data, _NOFOLLOW)
            offsets[k] = pos
            if fd < 0:
                got[k], sizes[k] = -1, -1
                continue
            size = _lseek(fd, 0, 2)
            sizes[k] = size
            if size < 0 or pos + size > buf.shape[0]:
                _close(fd)
                got[k] = -1 if size < 0 else -2
                continue
            n_read = 0
            while n_read < size:
                n = _pread(fd, buf[pos + n_read:].ctypes.data, size - n_read, n_read)
                if n <= 0:
                    break
                n_read += n
            _close(fd)
            got[k] = n_read
            pos += (n_read + align - 1) // align * align

    AVAILABLE = True
except (OSError, AttributeError, ImportError):  # not glibc-like, or no numba
    AVAILABLE = False


def read_packed(paths: list, buf: np.ndarray, align: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read several files back to back into ``buf`` with one release of the GIL for all of them.

    Returns (offset, bytes read, file size) per file; bytes read is -1 when the file could not be opened
    and -2 when it did not fit (the caller reads those another way, which also names the error).
    """
    n = len(paths)
    offsets = np.zeros(n, np.int64)
    got = np.full(n, -1, np.int64)
    sizes = np.full(n, -1, np.int64)
    if not AVAILABLE:  # the same in Python: one GIL release per system call
        pos = 0
        for k, path in enumerate(paths):
            offsets[k] = pos
            try:
                with open(path, "rb", buffering=0, opener=lambda p, fl: os.open(p, fl | _NOFOLLOW)) as handle:
                    sizes[k] = size = os.fstat(handle.fileno()).st_size
                    if pos + size > buf.shape[0]:
                        got[k] = -2
                        continue
                    got[k] = n_read = handle.readinto(memoryview(buf)[pos:pos + size])
            except OSError:
                continue  # got stays -1
            pos += (n_read + align - 1) // align * align
        return offsets, got, sizes
    encoded = [os.fsencode(p) + b"\0" for p in paths]
    starts = np.zeros(n, np.int64)
    starts[1:] = np.cumsum([len(e) for e in encoded])[:-1]
    names = np.frombuffer(b"".join(encoded), np.uint8)
    _read_packed(names, starts, buf, align, offsets, got, sizes)
    return offsets, got, sizes
