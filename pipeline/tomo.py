"""Tomographic reconstruction of XRD-CT sinograms: filtered back-projection (FBP), CPU or OpenCL.

A sinogram here is [angle, translation] for one channel or [channel, angle, translation] for a stack,
where a channel is a radial bin or the mean of a bin range (a Bragg peak of a phase, say) of the
pipeline's sinogram cube [rotation, translation, bin] (``/entry/sinogram/intensity``).

Geometry (parallel beam, the convention of :func:`pipeline.simulate.radon` and scikit-image)
    The output is an N x N image (N = number of translations by default), row = y, column = x, with
    pixel centres at ``x = col - (N - 1) / 2`` and ``y = row - (N - 1) / 2`` in translation steps,
    relative to the rotation axis.  At rotation angle ``theta`` the pixel is seen at translation
    ``t = center + x cos(theta) - y sin(theta)``: theta = 0 integrates over y, so the projection at 0
    is the column sum of the image.  ``center`` is the translation (in steps, may be fractional) where
    the rotation axis is; by default ``(T - 1) / 2``, the middle of the translation range.

Filter
    Zero-frequency-exact ramp (Kak & Slaney: built in real space then Fourier transformed, as
    scikit-image does) times the window of ``ram-lak`` (none), ``shepp-logan``, ``cosine``, ``hamming``
    or ``hann``.  Projections are padded to a power of two >= 2 T: with their edge values (``"edge"``,
    default: a constant air-scatter offset is then ignored and truncated samples do not ring) or with
    zeros (``"constant"``, what ``skimage.transform.iradon`` does).

Partially measured sinograms (the live case)
    Cells still NaN are not measured.  A rotation (row) is used when at least ``min_row_fraction`` of
    its translations are finite (across all channels); its missing cells are filled by linear
    interpolation along the translation (edge values beyond the ends).  Other rows get weight 0.
    Each used rotation is weighted by the angular arc it stands for: half the gap to the previous and to
    the next used angle on the circle of directions (period 180 degrees for a 180-degree scan, 360
    for a 360-degree one); a gap wider than twice the median gap is a wedge not measured yet and counts
    as one median gap, so that it does not blow the edge rows up; weights are then scaled to sum to pi.
    A complete regular scan thus gets the textbook weight pi / n_angles, a regularly subsampled or a
    contiguous partial scan pi / n_used, and a row missing in the middle is covered by its neighbours.

Centre of rotation (:func:`estimate_center`)
    ``"centroid"``: the centre of mass of every projection follows ``c + a cos(theta) + b sin(theta)``
    in parallel beam; a linear least-squares fit over the measured rows gives ``c`` (any angular set
    spanning about 90 degrees or more, provided the sample stays inside the translation range).  A
    low percentile of the sinogram is subtracted as background, and the centroids are taken over the
    widest window symmetric about the current fit, iterated: what background remains then pulls
    each centroid only towards the fit itself, so noise and offsets do not bias ``c``.
    ``"opposite"``: rows whose angles differ by 180 degrees are mirror images about ``c``; the mean
    squared difference of all such pairs is minimised over ``c`` (needs 360-degree data or pairs
    within ``pair_tolerance`` degrees of 180 apart).
    ``"sharpness"``: maximises the power (sum of squares over squared sum of absolute values) of the
    reconstruction of the channel sum over ``c`` within +- ``search`` steps of the centroid estimate
    (a wrong centre spreads every point into an arc); a grid then a bounded scalar search, about 20
    back-projections.  Needs no background model but is coarse and fragile with noise (on the phantom: 0.1-0.4 step
    noise-free, over a step with 1 % noise): a fallback for ``centroid``, never chosen by ``auto``.
    ``"auto"``: ``opposite`` when at least two exact opposite pairs are measured, else ``centroid``
    (exact for a sample inside the field of view and a constant background; ``sharpness`` is slower
    and, on the phantom, less precise, but needs neither).

Back-projection
    CPU: a sparse interpolation matrix (pixels x (angles x translations)), built once per geometry and
    cached, applied to all channels at once (scipy sparse x dense).  OpenCL: ``opencl/backproject.cl``
    through :class:`pipeline.opencl.tomo_engine.OpenCLBackprojector`, one work item per pixel and
    channel.  Both compute the same linear interpolation and agree to float32 rounding.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")
_FILTER_ALIASES = {"ramp": "ram-lak", "ramlak": "ram-lak", "ram_lak": "ram-lak", "shepp_logan": "shepp-logan",
                   "hanning": "hann", "none": "ram-lak"}
CENTER_METHODS = ("auto", "centroid", "opposite", "sharpness")


# -- angles, weights, filters ---------------------------------------------------------------------------


def default_angles(n_rotations: int, angular_range: float = 180.0) -> np.ndarray:
    """Rotation angles (degrees) of a regular scan: ``n_rotations`` steps over ``angular_range``, end excluded."""
    return np.linspace(0.0, float(angular_range), int(n_rotations), endpoint=False)


def angle_weights(angles_deg: np.ndarray, used: np.ndarray | None = None, angular_range: float = 180.0) -> np.ndarray:
    """Back-projection weight of each rotation (0 where not ``used``); the weights of used rows sum to pi.

    See the module docstring: capped arc (Voronoi) weights on the circle of period 180 or 360 degrees.
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    used = np.ones(angles.shape, bool) if used is None else np.asarray(used, bool)
    weights = np.zeros(angles.shape, np.float64)
    idx = np.flatnonzero(used)
    if idx.size == 0:
        return weights
    if idx.size == 1:
        weights[idx] = np.pi
        return weights
    period = 360.0 if angular_range > 180.0 + 1e-6 else 180.0
    a = np.mod(angles[idx], period)
    order = np.argsort(a, kind="stable")
    s = a[order]
    gaps = np.diff(np.concatenate([s, [s[0] + period]]))  # gap after each sorted angle (circular)
    positive = gaps[gaps > 1e-9]
    step = float(np.median(positive)) if positive.size else period
    g = np.where(gaps <= 2.01 * step, gaps, step)  # a wider gap is an unmeasured wedge: counted as one step
    arc = 0.5 * (g + np.roll(g, 1))  # half the gap after + half the gap before
    if arc.sum() <= 0:
        arc = np.ones_like(arc)
    w = np.empty_like(arc)
    w[order] = arc
    weights[idx] = w * (np.pi / w.sum())
    return weights


def _filter_name(name: str) -> str:
    key = name.lower().strip()
    key = _FILTER_ALIASES.get(key, key)
    if key not in FILTERS:
        raise ValueError(f"unknown filter {name!r}; choose one of {', '.join(FILTERS)}")
    return key


@functools.lru_cache(maxsize=32)
def fourier_filter(size: int, name: str = "ram-lak") -> np.ndarray:
    """The frequency response (length ``size``, FFT order) of a reconstruction filter.

    Real-space ramp (exact at zero frequency) times the window; identical to scikit-image's
    ``iradon`` filters, whose ramp is twice the textbook one (the back-projection weight here is
    therefore pi / n_angles / 2 per unit of that ramp; :func:`filter_sinogram` divides by two).
    """
    name = _filter_name(name)
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    response = 2 * np.real(np.fft.fft(f))
    if name == "shepp-logan":
        omega = np.pi * np.fft.fftfreq(size)[1:]
        response[1:] *= np.sin(omega) / omega
    elif name == "cosine":
        response *= np.fft.fftshift(np.sin(np.linspace(0, np.pi, size, endpoint=False)))
    elif name == "hamming":
        response *= np.fft.fftshift(np.hamming(size))
    elif name == "hann":
        response *= np.fft.fftshift(np.hanning(size))
    # symmetric in the FFT sense (H[k] = H[-k]); the shifted numpy windows are off by one bin, and taking
    # the real part after the inverse FFT, as iradon does, applies exactly this symmetrised response
    response = 0.5 * (response + np.roll(response[::-1], 1))
    response.setflags(write=False)
    return response


def padded_size(n: int) -> int:
    return max(64, int(2 ** np.ceil(np.log2(2 * n))))


def filter_sinogram(sino: np.ndarray, filter_name: str = "ram-lak", pad: str = "edge") -> np.ndarray:
    """Ramp-filter every row of ``sino`` [..., angle, translation] (finite values); float32 out.

    The result is scaled so that back-projecting with :func:`angle_weights` (sum pi) reconstructs
    the attenuation-like density in units of sinogram value per translation step.
    """
    sino = np.asarray(sino, dtype=np.float64)
    t = sino.shape[-1]
    size = padded_size(t)
    extra = size - t
    padded = np.zeros(sino.shape[:-1] + (size,), np.float64)
    padded[..., :t] = sino
    if pad == "edge":  # circular FFT: the pad after the last sample wraps onto the first
        right = extra // 2
        padded[..., t:t + right] = sino[..., -1:]
        padded[..., t + right:] = sino[..., :1]
    elif pad != "constant":
        raise ValueError("pad must be 'edge' or 'constant'")
    response = fourier_filter(size, _filter_name(filter_name))[: size // 2 + 1]
    out = np.fft.irfft(np.fft.rfft(padded, axis=-1) * response, n=size, axis=-1)[..., :t]
    return (0.5 * out).astype(np.float32)


# -- partial sinograms ----------------------------------------------------------------------------------


def usable_rows(sino: np.ndarray, min_row_fraction: float = 0.9) -> np.ndarray:
    """Rows (rotations) of ``sino`` [..., angle, translation] measured well enough to use (see module doc)."""
    finite = np.isfinite(sino)
    if finite.ndim == 3:
        finite = finite.all(axis=0)
    return finite.mean(axis=-1) >= min_row_fraction - 1e-12


def fill_rows(sino: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 copy of ``sino`` [channel, angle, translation] with used rows' NaNs interpolated and unused rows 0."""
    out = np.where(np.isfinite(sino), sino, np.nan).astype(np.float64)
    out[:, ~rows] = 0.0
    tpos = np.arange(sino.shape[-1])
    for a in np.flatnonzero(rows):
        for c in range(out.shape[0]):
            row = out[c, a]
            bad = ~np.isfinite(row)
            if bad.any():
                good = ~bad
                row[bad] = np.interp(tpos[bad], tpos[good], row[good]) if good.any() else 0.0
    return out


# -- back-projection -------------------------------------------------------------------------------------


def _geometry_key(angles: np.ndarray, ndet: int, size: int, center: float, circle: bool) -> tuple:
    return (np.asarray(angles, np.float64).tobytes(), int(ndet), int(size), round(float(center), 9), bool(circle))


_MATRIX_CACHE: dict[tuple, object] = {}
_MATRIX_LOCK = threading.Lock()


def projection_matrix(angles_deg: np.ndarray, ndet: int, size: int, center: float, circle: bool = False):
    """Sparse (size*size) x (angles*ndet) float32 linear-interpolation back-projection matrix (cached)."""
    import scipy.sparse as sp

    key = _geometry_key(angles_deg, ndet, size, center, circle)
    with _MATRIX_LOCK:
        if key in _MATRIX_CACHE:
            return _MATRIX_CACHE[key]
    theta = np.deg2rad(np.asarray(angles_deg, np.float64))
    origin = (size - 1) / 2.0
    coord = np.arange(size, dtype=np.float64) - origin
    x = np.tile(coord, size)  # pixel p = row * size + col
    y = np.repeat(coord, size)
    pix = np.arange(size * size)
    if circle:
        inside = x * x + y * y <= origin**2
        x, y, pix = x[inside], y[inside], pix[inside]
    nang = theta.size
    # [pixel, angle] order: the entries of each pixel (matrix row) come out contiguous, so the CSR
    # arrays are built directly (no COO sort)
    t = center + x[:, None] * np.cos(theta)[None, :] - y[:, None] * np.sin(theta)[None, :]
    valid = (t >= 0) & (t <= ndet - 1)
    i0 = np.clip(np.floor(t), 0, ndet - 2).astype(np.int32)
    frac = (t - i0).astype(np.float32)
    col0 = i0 + (np.arange(nang, dtype=np.int32) * ndet)[None, :]
    indices = np.stack([col0, col0 + 1], axis=-1)[valid].ravel()  # [entry, 2] -> interleaved
    data = np.stack([1.0 - frac, frac], axis=-1)[valid].ravel()
    counts = np.zeros(size * size, np.int64)
    counts[pix] = 2 * valid.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(size * size, nang * ndet))
    with _MATRIX_LOCK:
        if len(_MATRIX_CACHE) >= 8:
            _MATRIX_CACHE.pop(next(iter(_MATRIX_CACHE)))
        _MATRIX_CACHE[key] = matrix
    return matrix


def backproject_cpu(filtered: np.ndarray, angles_deg: np.ndarray, weights: np.ndarray, center: float,
                    size: int, circle: bool = False) -> np.ndarray:
    """Weighted back-projection of ``filtered`` [channel, angle, translation] to [channel, size, size] (float32)."""
    filtered = np.asarray(filtered, np.float32)
    nch, nang, ndet = filtered.shape
    matrix = projection_matrix(angles_deg, ndet, size, center, circle)
    rhs = (filtered * np.asarray(weights, np.float32)[None, :, None]).reshape(nch, nang * ndet)
    out = matrix @ np.ascontiguousarray(rhs.T)  # [pixel, channel]
    return np.ascontiguousarray(out.T, dtype=np.float32).reshape(nch, size, size)


_OPENCL: dict[tuple, object] = {}
_OPENCL_LOCK = threading.Lock()


def opencl_backprojector(device: str | None = None, gpu_only: bool = False):
    """A shared :class:`~pipeline.opencl.tomo_engine.OpenCLBackprojector`, or None when OpenCL (or, with
    ``gpu_only``, an OpenCL GPU) is unavailable.  ``device``: a spec for ``tomo_engine.pick_device``."""
    key = (device or "", gpu_only)
    with _OPENCL_LOCK:
        if key not in _OPENCL:
            try:
                from .opencl.tomo_engine import OpenCLBackprojector, pick_device

                found = pick_device(device, gpu_only=gpu_only)
                _OPENCL[key] = None if found is None else OpenCLBackprojector(found)
            except Exception as exc:  # no pyopencl, no device, build failure: CPU instead
                logger.info("OpenCL back-projection unavailable (%s); using the CPU", exc)
                _OPENCL[key] = None
        return _OPENCL[key]


# -- the reconstruction ----------------------------------------------------------------------------------


@dataclass
class Reconstruction:
    """Images [channel, y, x] and how they were made."""

    images: np.ndarray
    center: float
    angles: np.ndarray  # degrees, every row of the sinogram
    weights: np.ndarray  # per row; 0 = not used
    filter_name: str
    engine: str  # "cpu" or "opencl: <device>"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def rows_used(self) -> np.ndarray:
        return self.weights > 0

    @property
    def n_used(self) -> int:
        return int(np.count_nonzero(self.weights))


def _as_stack(sinogram: np.ndarray) -> tuple[np.ndarray, bool]:
    sino = np.asarray(sinogram)
    if sino.ndim == 2:
        return sino[None], True
    if sino.ndim == 3:
        return sino, False
    raise ValueError("sinogram must be [angle, translation] or [channel, angle, translation]")


def reconstruct(sinogram: np.ndarray, angles_deg: np.ndarray | None = None, *, angular_range: float = 180.0,
                center: float | str | None = None, filter_name: str = "ram-lak", size: int | None = None,
                engine: str = "auto", pad: str = "edge", circle: bool = False, min_row_fraction: float = 0.9,
                device: str | None = None) -> Reconstruction:
    """Filtered back-projection of ``sinogram`` [angle, translation] or [channel, angle, translation].

    ``angles_deg`` default: regular over ``angular_range`` (180 or 360).  ``center``: the rotation axis
    in translation steps; None = ``(T - 1) / 2``; a method name of :func:`estimate_center` to estimate it.
    ``size``: output N (default T).  ``engine``: ``"auto"`` (OpenCL on a GPU, or on ``device`` when named,
    else CPU), ``"cpu"`` or ``"opencl"`` (any OpenCL device, PoCL included).  Unmeasured (NaN) rows are
    left out and the others re-weighted.
    """
    t0 = time.perf_counter()
    stack, _ = _as_stack(sinogram)
    nch, nang, ndet = stack.shape
    if ndet < 2:
        raise ValueError("at least two translations are needed")
    angles = default_angles(nang, angular_range) if angles_deg is None else np.asarray(angles_deg, np.float64)
    if angles.shape != (nang,):
        raise ValueError(f"{angles.size} angles for {nang} sinogram rows")
    size = int(size or ndet)
    rows = usable_rows(stack, min_row_fraction)
    filled = fill_rows(stack, rows)
    if isinstance(center, str):
        center = estimate_center(np.where(rows[None, :, None], filled, np.nan), angles, method=center,
                                 angular_range=angular_range)
    center = (ndet - 1) / 2.0 if center is None else float(center)
    weights = angle_weights(angles, rows, angular_range)
    filtered = filter_sinogram(filled, filter_name, pad)
    backend = None
    if engine in ("auto", "opencl"):  # auto: a GPU (on a CPU device the sparse CPU path is faster)
        backend = opencl_backprojector(device, gpu_only=engine == "auto" and device is None)
        if backend is None and engine == "opencl":
            raise RuntimeError("OpenCL back-projection requested but no OpenCL device is usable")
    elif engine != "cpu":
        raise ValueError("engine must be 'auto', 'cpu' or 'opencl'")
    if rows.any():  # all rows go (unmeasured ones with weight 0): the CPU geometry stays cached as rows come
        if backend is not None:
            images = backend.backproject(filtered, angles, weights, center, size, circle)
        else:
            images = backproject_cpu(filtered, angles, weights, center, size, circle)
    else:
        images = np.zeros((nch, size, size), np.float32)
    name = "cpu" if backend is None else f"opencl: {backend.name}"
    return Reconstruction(images, center, angles, weights, _filter_name(filter_name), name,
                          time.perf_counter() - t0)


def fbp(sinogram: np.ndarray, angles_deg: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """Like :func:`reconstruct` but returns the image(s) only: [N, N] for a 2D sinogram, else [channel, N, N]."""
    result = reconstruct(sinogram, angles_deg, **kwargs)
    return result.images[0] if np.asarray(sinogram).ndim == 2 else result.images


# -- centre of rotation ----------------------------------------------------------------------------------


def _background_removed(stack: np.ndarray, clip: bool = True) -> np.ndarray:
    out = np.empty(stack.shape, np.float64)
    for c in range(stack.shape[0]):
        vals = stack[c][np.isfinite(stack[c])]
        base = np.percentile(vals, 2) if vals.size else 0.0
        out[c] = np.clip(stack[c] - base, 0, None) if clip else stack[c] - base
    return out


def _center_centroid(stack: np.ndarray, angles: np.ndarray, iterations: int = 8) -> float:
    data = _background_removed(stack, clip=False).sum(axis=0)  # [angle, translation]
    rows = np.isfinite(data).all(axis=1)
    data = data[rows]
    theta = np.deg2rad(angles[rows])
    if data.shape[0] < 3:
        raise ValueError("the centroid method needs at least three measured rotations")
    ndet = data.shape[1]
    tpos = np.arange(ndet, dtype=np.float64)
    design = np.stack([np.ones(theta.size), np.cos(theta), np.sin(theta)], axis=1)
    centre = np.full(theta.size, (ndet - 1) / 2.0)
    coef = np.array([(ndet - 1) / 2.0, 0.0, 0.0])
    for _ in range(iterations):
        # the largest window symmetric about the current estimate: a residual constant background (and
        # zero-mean noise) then pulls the centroid towards that estimate only, so the iteration is unbiased
        half = np.clip(np.minimum(centre, ndet - 1 - centre), 1.0, None)
        w = np.clip(half[:, None] + 0.5 - np.abs(tpos[None, :] - centre[:, None]), 0.0, 1.0)
        mass = (w * data).sum(axis=1)
        good = mass > 0.2 * np.median(mass)
        if good.sum() < 3:
            raise ValueError("too few rotations with signal for the centroid method")
        centroid = (w * data * tpos).sum(axis=1)[good] / mass[good]
        coef, *_ = np.linalg.lstsq(design[good], centroid, rcond=None)
        centre = np.clip(design @ coef, 0.0, ndet - 1.0)
    return float(coef[0])


def _opposite_pairs(angles: np.ndarray, rows: np.ndarray, tolerance: float) -> list[tuple[int, int]]:
    idx = np.flatnonzero(rows)
    pairs = []
    for i in idx:
        diff = np.abs(np.mod(angles[idx] - angles[i] - 180.0 + 180.0, 360.0) - 180.0)
        j = int(np.argmin(diff))
        if diff[j] <= tolerance and idx[j] > i:
            pairs.append((int(i), int(idx[j])))
    return pairs


def _center_opposite(stack: np.ndarray, angles: np.ndarray, tolerance: float) -> float:
    from scipy.optimize import minimize_scalar

    data = _background_removed(stack, clip=False).sum(axis=0)
    rows = np.isfinite(data).all(axis=1)
    pairs = _opposite_pairs(angles, rows, tolerance)
    if not pairs:
        raise ValueError("no pair of measured rotations 180 degrees apart")
    ndet = data.shape[1]
    tpos = np.arange(ndet, dtype=np.float64)
    a = data[[p[0] for p in pairs]]
    b = data[[p[1] for p in pairs]]

    def cost(c: float) -> float:
        mirrored = 2 * c - tpos  # b(2c - t) should equal a(t)
        inside = (mirrored >= 0) & (mirrored <= ndet - 1)
        if inside.sum() < 3:
            return np.inf
        bm = np.stack([np.interp(mirrored[inside], tpos, row) for row in b])
        return float(np.mean((a[:, inside] - bm) ** 2))

    # coarse scan (robust to local minima), then a bounded refinement
    grid = np.arange(ndet * 0.25, ndet * 0.75 + 0.25, 0.5)
    best = grid[int(np.argmin([cost(c) for c in grid]))]
    res = minimize_scalar(cost, bounds=(best - 0.5, best + 0.5), method="bounded", options={"xatol": 1e-3})
    return float(res.x)


def _center_sharpness(stack: np.ndarray, angles: np.ndarray, angular_range: float, start: float,
                      search: float) -> float:
    from scipy.optimize import minimize_scalar

    data = _background_removed(stack).sum(axis=0)
    rows = np.isfinite(data).all(axis=1)
    filled = fill_rows(data[None], rows)
    filtered = filter_sinogram(filled, "shepp-logan", "edge")[:, rows]
    weights = angle_weights(angles, rows, angular_range)[rows]
    size = data.shape[1]

    def cost(c: float) -> float:  # minus the image power: a wrong centre spreads every point into an arc
        image = backproject_cpu(filtered, angles[rows], weights, c, size, circle=True)[0]
        return -float(np.sum(image.astype(np.float64) ** 2)) / (float(np.abs(image).sum()) ** 2 + 1e-30)

    grid = np.linspace(start - search, start + search, 9)
    costs = [cost(c) for c in grid]
    k = int(np.argmin(costs))
    step = grid[1] - grid[0]
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    res = minimize_scalar(cost, bounds=(lo, hi), method="bounded", options={"xatol": 0.01 * step + 1e-3})
    with _MATRIX_LOCK:  # the trial geometries are of no further use
        for key in [k_ for k_ in _MATRIX_CACHE if k_[0] == np.asarray(angles[rows], np.float64).tobytes()]:
            if key[3] != round(float(res.x), 9):
                _MATRIX_CACHE.pop(key, None)
    return float(res.x)


def estimate_center(sinogram: np.ndarray, angles_deg: np.ndarray | None = None, method: str = "auto", *,
                    angular_range: float = 180.0, pair_tolerance: float = 0.01, search: float = 3.0,
                    min_row_fraction: float = 0.9) -> float:
    """Rotation-axis position (translation steps) from ``sinogram`` [angle, trans] or [channel, angle, trans].

    Methods (module docstring): ``centroid``, ``opposite``, ``sharpness`` (search +- ``search`` steps
    around the centroid estimate), ``auto``.  Channels are summed after background removal; rows with
    too few measured cells are ignored.
    """
    stack, _ = _as_stack(sinogram)
    stack = np.asarray(stack, np.float64)
    nang = stack.shape[1]
    angles = default_angles(nang, angular_range) if angles_deg is None else np.asarray(angles_deg, np.float64)
    rows = usable_rows(stack, min_row_fraction)
    stack = np.where(rows[None, :, None], fill_rows(stack, rows), np.nan)
    if method not in CENTER_METHODS:
        raise ValueError(f"unknown centre method {method!r}; choose one of {', '.join(CENTER_METHODS)}")
    if method == "auto":
        method = "opposite" if len(_opposite_pairs(angles, rows, pair_tolerance)) >= 2 else "centroid"
    if method == "centroid":
        return _center_centroid(stack, angles)
    if method == "opposite":
        return _center_opposite(stack, angles, pair_tolerance)
    return _center_sharpness(stack, angles, angular_range, _center_centroid(stack, angles), search)


# -- channels -------------------------------------------------------------------------------------------


def peak_bins(patterns: np.ndarray, n: int = 3, width: int = 3, min_separation: int | None = None,
              background_window: int = 51) -> list[tuple[int, int]]:
    """Half-open bin ranges ``(start, stop)`` around the ``n`` strongest peaks of the mean pattern.

    ``patterns`` is [..., bin] (a sinogram cube or a list of patterns; NaN ignored).  Strength is
    the excess over a running median background; peaks closer than ``min_separation`` bins
    (default ``4 * width``) to a stronger one are skipped.  Sorted by strength.
    """
    from scipy.ndimage import median_filter
    from scipy.signal import find_peaks

    flat = np.asarray(patterns, np.float64).reshape(-1, np.shape(patterns)[-1])
    finite = np.isfinite(flat).all(axis=1)
    mean = flat[finite].mean(axis=0) if finite.any() else np.nan_to_num(flat).mean(axis=0)
    mean = np.nan_to_num(mean)
    excess = mean - median_filter(mean, size=min(background_window, mean.size), mode="nearest")
    peaks, _ = find_peaks(excess)
    peaks = peaks[np.argsort(excess[peaks])[::-1]]
    sep = 4 * width if min_separation is None else min_separation
    chosen: list[int] = []
    for p in peaks:
        if excess[p] <= 0:
            break
        if all(abs(int(p) - c) > sep for c in chosen):
            chosen.append(int(p))
        if len(chosen) == n:
            break
    nb = mean.size
    return [(max(0, p - width), min(nb, p + width + 1)) for p in chosen]


def radial_to_bins(radial: np.ndarray, ranges: Sequence[tuple[float, float]]) -> list[tuple[int, int]]:
    """Half-open bin ranges whose bin centres lie within each ``(low, high)`` radial range (q, 2theta...).

    A range narrower than a bin gives the nearest bin.  ``radial`` must be increasing.
    """
    radial = np.asarray(radial, np.float64)
    out = []
    for low, high in ranges:
        low, high = sorted((float(low), float(high)))
        if high < radial[0] or low > radial[-1]:
            raise ValueError(f"radial range ({low}, {high}) is outside the axis [{radial[0]}, {radial[-1]}]")
        a = int(np.searchsorted(radial, low, side="left"))
        b = int(np.searchsorted(radial, high, side="right"))
        if b <= a:
            k = int(np.argmin(np.abs(radial - 0.5 * (low + high))))
            a, b = k, k + 1
        out.append((max(a, 0), min(b, radial.size)))
    return out


def channel_sinograms(cube: np.ndarray, bin_ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """[channel, rotation, translation] float32: the mean over each bin range of ``cube`` [rotation, translation,
    bin]; NaN where a cell is not measured."""
    cube = np.asarray(cube)
    out = np.empty((len(bin_ranges),) + cube.shape[:2], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        for k, (a, b) in enumerate(bin_ranges):
            out[k] = np.nanmean(cube[:, :, a:b], axis=2)
    return out


# -- NeXus ----------------------------------------------------------------------------------------------


@dataclass
class TomogramSet:
    """Tomograms of a NeXus sinogram: what :func:`write_tomograms` writes."""

    reconstruction: Reconstruction
    bin_ranges: list[tuple[int, int]]
    radial: np.ndarray | None = None
    radial_name: str = "radial"
    radial_units: str = ""
    sinograms: np.ndarray | None = None  # [channel, rotation, translation]

    @property
    def images(self) -> np.ndarray:
        return self.reconstruction.images

    def radial_ranges(self) -> np.ndarray | None:
        """[channel, 2]: radial value of the first and the last bin of each range."""
        if self.radial is None:
            return None
        return np.array([[self.radial[a], self.radial[b - 1]] for a, b in self.bin_ranges], np.float64)

    def labels(self) -> list[str]:
        rr = self.radial_ranges()
        if rr is None:
            return [f"bins {a}-{b - 1}" for a, b in self.bin_ranges]
        return [f"{self.radial_name} {lo:.4g}-{hi:.4g} {self.radial_units}".strip() for lo, hi in rr]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rotation_angles(sino_group, n_rot: int, angles_deg, angular_range: float) -> np.ndarray:
    if angles_deg is not None:
        return np.asarray(angles_deg, np.float64)
    rot = sino_group.get("rotation")
    if rot is not None and _text(rot.attrs.get("units", "")).lower() in ("degree", "degrees", "deg"):
        return np.asarray(rot[()], np.float64)
    return default_angles(n_rot, angular_range)


def reconstruct_nexus(nexus_file: str | Path, bins: Sequence[tuple[int, int]] | str | None = None, *,
                      q_ranges: Sequence[tuple[float, float]] | None = None, n_peaks: int = 3, width: int = 3,
                      angles_deg: np.ndarray | None = None, angular_range: float = 180.0,
                      chunk: int = 64, **kwargs) -> TomogramSet:
    """Tomograms of the sinogram in ``nexus_file`` (read in SWMR mode, so it may still be growing).

    Channels: ``bins`` (half-open bin ranges, or ``"all"`` for every bin), else ``q_ranges`` in the units
    of the file's radial axis, else the ``n_peaks`` strongest peaks of the mean pattern (+- ``width``
    bins).  Angles: ``angles_deg``, else the sinogram's rotation axis when in degrees, else regular over
    ``angular_range``.  Other keywords go to :func:`reconstruct`; a centre given as a method is
    estimated once (on the first chunk of channels) and reused.
    """
    import h5py

    with h5py.File(nexus_file, "r", swmr=True) as f:
        group = f["entry/sinogram"]
        cube = group["intensity"][()]
        axes = [_text(a) for a in np.atleast_1d(group.attrs.get("axes", []))]
        rname = axes[2] if len(axes) == 3 else "radial"
        radial = group[rname][()] if rname in group else None
        runits = _text(group[rname].attrs.get("units", "")) if radial is not None else ""
        angles = _rotation_angles(group, cube.shape[0], angles_deg, angular_range)
    if isinstance(bins, str):
        if bins != "all":
            raise ValueError("bins must be ranges or 'all'")
        ranges = [(k, k + 1) for k in range(cube.shape[2])]
    elif bins is not None:
        ranges = [(int(a), int(b)) for a, b in bins]
    elif q_ranges is not None:
        if radial is None:
            raise ValueError("the file has no radial axis to convert q ranges")
        ranges = radial_to_bins(radial, q_ranges)
    else:
        ranges = peak_bins(cube, n=n_peaks, width=width)
    sinos = channel_sinograms(cube, ranges)
    parts = []
    for start in range(0, len(ranges), max(1, chunk)):
        part = reconstruct(sinos[start:start + chunk], angles, angular_range=angular_range, **kwargs)
        kwargs["center"] = part.center
        parts.append(part)
    rec = parts[0]
    if len(parts) > 1:
        rec = Reconstruction(np.concatenate([p.images for p in parts]), rec.center, rec.angles, rec.weights,
                             rec.filter_name, rec.engine, sum(p.seconds for p in parts))
    return TomogramSet(rec, ranges, radial, rname, runits, sinos)


def write_tomograms(nexus_file: str | Path, tomograms: TomogramSet | None = None, *, name: str = "tomogram",
                    set_default: bool = False, **kwargs) -> TomogramSet:
    """Add (or replace) the NXdata ``/entry/<name>`` [channel, y, x] to a closed NeXus file of the pipeline.

    ``tomograms`` default: ``reconstruct_nexus(nexus_file, **kwargs)``.  Written: ``intensity``
    float32 [channel, y, x]; axes ``channel`` (index, with ``channel_label``, ``bin_range`` [channel, 2]
    and ``<radial>_range`` [channel, 2]), ``y`` and ``x`` (translation steps from the rotation axis);
    reconstruction parameters (centre, filter, angles, rotations used, engine) as datasets of the
    group.  ``set_default`` makes ``/entry@default`` point at it (a viewer then opens the tomogram).
    """
    import h5py

    if tomograms is None:
        tomograms = reconstruct_nexus(nexus_file, **kwargs)
    elif kwargs:
        raise TypeError("reconstruction keywords are only taken when no tomograms are given")
    rec = tomograms.reconstruction
    images = np.asarray(rec.images, np.float32)
    nch, ny, nx = images.shape
    coord_y = np.arange(ny, dtype=np.float64) - (ny - 1) / 2.0
    coord_x = np.arange(nx, dtype=np.float64) - (nx - 1) / 2.0
    with h5py.File(nexus_file, "r+") as f:
        entry = f["entry"]
        if name in entry:
            del entry[name]
        g = entry.create_group(name)
        g.attrs.update(NX_class="NXdata", signal="intensity", axes=["channel", "y", "x"], interpretation="image",
                       channel_indices=0, y_indices=1, x_indices=2,
                       title=f"filtered back-projection ({rec.filter_name})")
        ds = g.create_dataset("intensity", data=images, chunks=(1, ny, nx), compression="gzip", compression_opts=4)
        ds.attrs.update(long_name="reconstructed intensity per translation step",
                        units="sinogram units / translation step")
        ch = g.create_dataset("channel", data=np.arange(nch, dtype=np.int64))
        ch.attrs.update(long_name="channel (bin range)", units="index")
        g.create_dataset("channel_label", data=np.array(tomograms.labels(), dtype=h5py.string_dtype()))
        br = g.create_dataset("bin_range", data=np.array(tomograms.bin_ranges, dtype=np.int64).reshape(nch, 2))
        br.attrs.update(long_name="radial bins [start, stop) averaged into each channel", units="bin index")
        rr = tomograms.radial_ranges()
        if rr is not None:
            rds = g.create_dataset(f"{tomograms.radial_name}_range", data=rr)
            rds.attrs.update(units=tomograms.radial_units,
                             long_name=f"{tomograms.radial_name} of the first and last bin of each channel")
        for axis_name, values in (("y", coord_y), ("x", coord_x)):
            a = g.create_dataset(axis_name, data=values)
            a.attrs.update(units="translation step",
                           long_name=f"{axis_name} from the rotation axis (translation steps)")
        par = dict(center=rec.center, filter=rec.filter_name, engine=rec.engine)
        for key, value in par.items():
            g.create_dataset(f"reconstruction_{key}", data=value)
        g["reconstruction_center"].attrs.update(units="translation step",
                                                long_name="rotation axis position on the translation axis")
        ang = g.create_dataset("rotation_angle", data=rec.angles)
        ang.attrs["units"] = "degree"
        used = g.create_dataset("rotation_used", data=rec.rows_used.astype(np.uint8))
        used.attrs["meaning"] = "1 = rotation measured and back-projected"
        g.create_dataset("rotation_weight", data=rec.weights)
        if set_default:
            entry.attrs["default"] = name
    return tomograms


# -- pictures ---------------------------------------------------------------------------------------------


def _grey(img: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.5) -> np.ndarray:
    """[h, w, 3] uint8; NaN (not measured) shown dark red."""
    finite = np.isfinite(img)
    out = np.zeros(img.shape + (3,), np.uint8)
    if finite.any():
        lo, hi = np.percentile(img[finite], lo_pct), np.percentile(img[finite], hi_pct)
        v = np.clip((np.where(finite, img, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
        out[:] = (v * 255).astype(np.uint8)[..., None]
    out[~finite] = (70, 0, 0)
    return out


def save_tomogram_png(png: str | Path, tomograms: np.ndarray | TomogramSet, sinograms: np.ndarray | None = None,
                      *, max_channels: int = 3, min_height: int = 240, gap: int = 4) -> Path:
    """One picture: a row per channel (at most ``max_channels``) with its sinogram [rotation, translation]
    on the left and its tomogram on the right, plus, for 2 or 3 channels, an RGB overlay of the
    tomograms (channel k in colour k).  Unmeasured sinogram cells appear dark red."""
    from .preview import write_png

    if isinstance(tomograms, TomogramSet):
        sinograms = tomograms.sinograms if sinograms is None else sinograms
        tomograms = tomograms.images
    tomos = np.asarray(tomograms, np.float64)
    if tomos.ndim == 2:
        tomos = tomos[None]
    tomos = tomos[:max_channels]
    sinos = None
    if sinograms is not None:
        sinos = np.asarray(sinograms, np.float64)
        sinos = (sinos[None] if sinos.ndim == 2 else sinos)[:max_channels]
    height = max(tomos.shape[1], sinos.shape[1] if sinos is not None else 0)
    scale = max(1, -(-min_height // max(height, 1)))
    panels_rows = []
    for k in range(tomos.shape[0]):
        parts = []
        if sinos is not None:
            parts.append(_grey(sinos[k]))
        parts.append(_grey(tomos[k]))
        if k == 0 and 2 <= tomos.shape[0] <= 3:
            rgb = np.zeros(tomos.shape[1:] + (3,), np.uint8)
            for c in range(tomos.shape[0]):
                rgb[..., c] = _grey(tomos[c])[..., 0]
            parts.append(rgb)
        panels_rows.append(parts)
    width_cols = max(len(r) for r in panels_rows)
    col_w = [0] * width_cols
    for r in panels_rows:
        for i, p in enumerate(r):
            col_w[i] = max(col_w[i], p.shape[1])
    row_h = [max(p.shape[0] for p in r) for r in panels_rows]
    canvas = np.full(((sum(row_h) + gap * (len(row_h) - 1)) * scale,
                      (sum(col_w) + gap * (width_cols - 1)) * scale, 3), 32, np.uint8)
    y = 0
    for r, h in zip(panels_rows, row_h):
        x = 0
        for i, p in enumerate(r):
            big = np.repeat(np.repeat(p, scale, axis=0), scale, axis=1)
            canvas[y:y + big.shape[0], x:x + big.shape[1]] = big
            x += (col_w[i] + gap) * scale
        y += (h + gap) * scale
    write_png(png, canvas)
    return Path(png)


def save_nexus_tomogram_png(nexus_file: str | Path, png: str | Path, name: str = "tomogram", **kwargs) -> Path:
    """:func:`save_tomogram_png` of the tomogram group written by :func:`write_tomograms` and its sinograms."""
    import h5py

    with h5py.File(nexus_file, "r", swmr=True) as f:
        g = f["entry"][name]
        images = g["intensity"][()]
        ranges = [tuple(int(v) for v in r) for r in g["bin_range"][()]]
        cube = f["entry/sinogram/intensity"][()]
    return save_tomogram_png(png, images, channel_sinograms(cube, ranges), **kwargs)
