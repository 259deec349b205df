"""OpenCL back-projection for :mod:`pipeline.tomo` (kernel in ``backproject.cl``).

The host filters the sinograms (a few FFTs, cheap); the device back-projects every
channel at once, one work item per output pixel and channel.  Buffers are kept
between calls and regrown only when a larger problem comes, so a live update
costs one upload of the filtered sinograms and one download of the tomograms.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

try:
    import pyopencl as cl
except ImportError as exc:  # pragma: no cover - pipeline.tomo falls back to the CPU
    raise ImportError(f"pyopencl is not importable: {exc}") from exc

from .devices import find_device  # noqa: E402

KERNEL = Path(__file__).with_name("backproject.cl")


def pick_device(spec: str | None = None, gpu_only: bool = False):
    """An OpenCL device by ``"P:D"`` or a part of its name, else the first GPU (see :func:`devices.find_device`)."""
    return find_device(spec, gpu_only=gpu_only)


class OpenCLBackprojector:
    """Back-projects filtered sinograms [channel, angle, translation] on an OpenCL device.

    Thread-safe (one call at a time).  ``device`` is a ``pyopencl.Device``, a spec for
    :func:`pick_device`, or None for the default choice.
    """

    def __init__(self, device=None):
        if device is None or isinstance(device, str):
            found = pick_device(device)
            if found is None:
                raise RuntimeError(f"no OpenCL device{f' matching {device!r}' if device else ''}")
            device = found
        self.device = device
        self.ctx = cl.Context([device])
        self.queue = cl.CommandQueue(self.ctx, device)
        self.program = cl.Program(self.ctx, KERNEL.read_text()).build()
        self.kernel = cl.Kernel(self.program, "backproject")
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, object]] = {}

    @property
    def name(self) -> str:
        return f"{self.device.platform.name.strip()} / {self.device.name.strip()}"

    def _buffer(self, key: str, nbytes: int, flags):
        held = self._buffers.get(key)
        if held is None or held[0] < nbytes:
            held = (nbytes, cl.Buffer(self.ctx, flags, max(nbytes, 4)))
            self._buffers[key] = held
        return held[1]

    def backproject(self, filtered: np.ndarray, angles_deg: np.ndarray, weights: np.ndarray, center: float,
                    size: int, circle: bool = False) -> np.ndarray:
        """Images [channel, size, size] (float32) of ``filtered`` [channel, angle, translation]."""
        filtered = np.ascontiguousarray(filtered, dtype=np.float32)
        if filtered.ndim != 3:
            raise ValueError("filtered must be [channel, angle, translation]")
        nch, nang, ndet = filtered.shape
        if ndet < 2:
            raise ValueError("at least two translations are needed")
        theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
        trig = np.ascontiguousarray(np.stack([np.cos(theta), np.sin(theta)], axis=1), dtype=np.float32)
        w = np.ascontiguousarray(weights, dtype=np.float32)
        if trig.shape[0] != nang or w.shape[0] != nang:
            raise ValueError("one angle and one weight per sinogram row are needed")
        out = np.empty((nch, size, size), dtype=np.float32)
        origin = (size - 1) / 2.0
        radius2 = origin**2 if circle else -1.0
        mf = cl.mem_flags
        with self._lock:
            d_in = self._buffer("filtered", filtered.nbytes, mf.READ_ONLY)
            d_trig = self._buffer("trig", trig.nbytes, mf.READ_ONLY)
            d_w = self._buffer("weights", w.nbytes, mf.READ_ONLY)
            d_out = self._buffer("out", out.nbytes, mf.WRITE_ONLY)
            cl.enqueue_copy(self.queue, d_in, filtered, is_blocking=False)
            cl.enqueue_copy(self.queue, d_trig, trig, is_blocking=False)
            cl.enqueue_copy(self.queue, d_w, w, is_blocking=False)
            self.kernel.set_args(d_in, d_trig, d_w, np.int32(nang), np.int32(ndet), np.int32(size),
                                 np.float32(center), np.float32(origin), np.float32(radius2), d_out)
            cl.enqueue_nd_range_kernel(self.queue, self.kernel, (size, size, nch), None)
            cl.enqueue_copy(self.queue, out, d_out, is_blocking=True)
        return out
