"""CPU engine: decode and integrate a frame in one pass over its pixels.

The compressed stream is decoded pixel by pixel and each value is scattered
straight into the bins it belongs to (CSC layout), so the 10 MB int32 image is
never written to memory.  Statically masked pixels have no entries; pixels
whose value marks a gap or a bad pixel (the dummy range) are removed from the
per-bin normalisation on the fly, so the result equals pyFAI's for the same
method.  Compiled with ``nogil``: one frame per worker thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cbf import CbfFrame, CorruptCbfError
from .decode import OK, TOO_MANY, _next_delta, check_status
from .engines import cpu_count
from .geometry import IntegrationSetup
from .results import FrameResult, finish_sums


@njit(nogil=True, cache=True)
def decode_integrate(src, n_pixels, indptr, bins, coef, norm, lo, hi, check_dummy,
                     sig, var, dnorm, dnorm_sq, dcount, poisson):
    """One pass: decode ``src`` and accumulate the per-bin sums.

    ``sig``/``var`` receive sum c*s and sum c^2*max(s, 1); ``dnorm``,
    ``dnorm_sq``, ``dcount`` receive what frame-dependent invalid pixels remove
    from the static sums.  Returns (values decoded, bytes used, status).
    """
    end = src.shape[0]
    pos = 0
    count = 0
    current = np.int64(0)
    while pos < end:
        delta, pos, status = _next_delta(src, pos, end)
        if status != OK:
            return count, pos, status
        if count >= n_pixels:
            return count, pos, TOO_MANY
        current += delta
        j = count
        count += 1
        start = indptr[j]
        stop = indptr[j + 1]
        if start == stop:
            continue
        value = np.float32(np.int32(current))
        if check_dummy and lo <= value <= hi:
            n = np.float64(norm[j])
            for k in range(start, stop):
                c = np.float64(coef[k])
                b = bins[k]
                dnorm[b] += c * n
                dnorm_sq[b] += (c * n) * (c * n)
                dcount[b] += c
            continue
        s = np.float64(value)
        v = s if s > 1.0 else 1.0
        for k in range(start, stop):
            c = np.float64(coef[k])
            b = bins[k]
            sig[b] += c * s
            if poisson:
                var[b] += c * c * v
    return count, pos, OK


@njit(nogil=True, cache=True)
def decode_histogram(src, n_pixels, pixel_bin, norm, lo, hi, check_dummy,
                     sig, var, dnorm, dnorm_sq, dcount, poisson):
    """No pixel splitting: each pixel has one bin (or -1 when masked), weight 1.

    The hot loop reads 1 compressed byte and 4 index bytes a pixel; the
    normalisation of a pixel is read only when its value marks it invalid.
    """
    end = src.shape[0]
    pos = 0
    count = 0
    current = np.int64(0)
    while pos < end:
        b = np.int64(np.int8(src[pos]))
        if b != -128:
            pos += 1
            delta = b
        else:
            delta, pos, status = _next_delta(src, pos, end)
            if status != OK:
                return count, pos, status
        if count >= n_pixels:
            return count, pos, TOO_MANY
        current += delta
        k = pixel_bin[count]
        count += 1
        if k < 0:
            continue
        value = np.float32(np.int32(current))
        if check_dummy and lo <= value <= hi:
            n = np.float64(norm[count - 1])
            dnorm[k] += n
            dnorm_sq[k] += n * n
            dcount[k] += 1.0
            continue
        s = np.float64(value)
        sig[k] += s
        if poisson:
            var[k] += s if s > 1.0 else 1.0
    return count, pos, OK


class CpuEngine:
    """Decode + integrate on the CPU; thread-safe, one call per frame."""

    name = "cpu"
    batch_size = 1

    def __init__(self, setup: IntegrationSetup, workers: int = 0):
        self.setup = setup
        self.concurrency = workers or cpu_count()
        lo, hi, active = setup.dummy_range
        self._dummy = (np.float32(lo), np.float32(hi), active)
        self._poisson = setup.config.error_model == "poisson"
        self._pixel_bin = None
        if setup.is_histogram:
            pixel_bin = np.full(setup.n_pixels, -1, dtype=np.int32)
            has = np.diff(setup.csc_indptr) == 1
            pixel_bin[has] = setup.csc_indices[setup.csc_indptr[:-1][has]]
            self._pixel_bin = pixel_bin

    @property
    def description(self) -> str:
        kind = "histogram" if self._pixel_bin is not None else "CSC"
        return f"cpu: fused byte-offset decode + {kind} integration, {self.concurrency} threads"

    def integrate_batch(self, frames: list[CbfFrame]) -> list[FrameResult | Exception]:
        out: list[FrameResult | Exception] = []
        for frame in frames:
            try:
                out.append(self.integrate(frame))
            except CorruptCbfError as exc:
                out.append(exc)
        return out

    def integrate(self, frame: CbfFrame) -> FrameResult:
        setup = self.setup
        if frame.shape != setup.shape:
            raise CorruptCbfError(f"frame shape {frame.shape} differs from the detector's {setup.shape}")
        nb = setup.nbins
        sums = np.zeros((5, nb), dtype=np.float64)
        src = np.frombuffer(frame.raw, dtype=np.uint8)
        lo, hi, active = self._dummy
        if self._pixel_bin is not None:
            count, _, status = decode_histogram(
                src, setup.n_pixels, self._pixel_bin, setup.norm,
                lo, hi, active, sums[0], sums[1], sums[2], sums[3], sums[4], self._poisson)
        else:
            count, _, status = decode_integrate(
                src, setup.n_pixels, setup.csc_indptr, setup.csc_indices, setup.csc_data, setup.norm,
                lo, hi, active, sums[0], sums[1], sums[2], sums[3], sums[4], self._poisson)
        check_status(count, setup.n_pixels, status)
        return finish_sums(setup, sums[0], sums[1], sums[2], sums[3], sums[4], self._poisson)

    def integrate_image(self, image: np.ndarray) -> FrameResult:
        """Integrate an already decoded image (used by tests and the bench's references)."""
        from .results import integrate_image_reference

        return integrate_image_reference(self.setup, image)
