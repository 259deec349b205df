"""Live tomograms: filtered back-projection of the rotations measured so far, repeated while the scan runs.

:class:`LiveTomography` owns one daemon thread.  Every ``interval`` seconds it asks the caller's
``snapshot()`` for the sinogram cube [rotation, translation, bin] and the ``measured`` flags
[rotation, translation], and when rotations have been completed since its last update it
reconstructs the chosen channels with :func:`pipeline.tomo.reconstruct` (the same code as the
offline tomograms: rows not measured get weight 0, the others are re-weighted) and keeps the
result as a :class:`LiveTomogramSet` (a :class:`pipeline.tomo.TomogramSet`; :attr:`LiveTomography.latest`).
:func:`create_live_datasets` / :func:`write_live` put it into the SWMR NeXus file.

Why a thread that releases the GIL
    The reduction pipeline is limited by Python threads sharing the GIL (docs/PERFORMANCE.md).  The
    reconstruction's heavy parts run in code that releases it: numpy's FFT (the ramp filter),
    scipy's sparse x dense product (``sparsetools`` drops the GIL for numeric types: the CPU
    back-projection) or the OpenCL kernel (pyopencl drops the GIL while it waits for the device).
    Python-level work per update is O(rotations x channels) small numpy calls (a few ms), so the
    pipeline's threads keep the GIL nearly all the time; ``scripts/tomo_timing.py`` measures it.
    The thread also rests at least as long as it worked (``max_busy_fraction``), so on a CPU-only
    machine it never takes more than half of one core.

Consistency without locks on the writer's arrays
    ``snapshot`` may return views of the writer's arrays (no copy) provided the writer stores a cell's
    pattern *before* its ``measured`` flag (as ``NexusWriter.add`` does).  The flags are copied first,
    then only rotations whose every cell is flagged (reduced, missing or failed) are read from the
    cube; the other rows are set to NaN, so a pattern being written while it is read is never used.

Centre of rotation
    Given as a number: used as is.  Otherwise (None = ``"auto"``, or a method name of
    :func:`pipeline.tomo.estimate_center`) the geometric centre ``(T - 1) / 2`` is used until half the
    rotations are complete, then the centre is estimated once from the chosen channels and kept, so
    that the tomograms do not jump from one update to the next.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import tomo

if TYPE_CHECKING:  # h5py only for the NeXus helpers: the timing script runs without it
    import h5py

logger = logging.getLogger(__name__)

Snapshot = Callable[[], tuple[np.ndarray, np.ndarray | None]]
EventCallback = Callable[[str, str], None]

EVENT_INFO = "tomogram"
EVENT_ERROR = "tomogram-error"


@dataclass
class LiveTomogramSet(tomo.TomogramSet):
    """A :class:`pipeline.tomo.TomogramSet` (so ``write_tomograms`` and ``save_tomogram_png`` take it) with the
    live update's facts at hand."""

    rotations_complete: int = 0  # rotations whose every frame was done when the snapshot was taken
    updated_time: float = float("nan")  # time.time() of the update
    update: int = 0  # 1, 2, ... (LiveTomography.version after it)
    center_estimated: bool = False

    @property
    def center(self) -> float:
        return self.reconstruction.center

    @property
    def rotations_used(self) -> int:
        """Rotations back-projected (complete ones with >= min_row_fraction of finite cells)."""
        return self.reconstruction.n_used


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class LiveTomography:
    """Tomograms of the rotations measured so far, refreshed in a background thread.

    ``radial``: the radial axis [bin] of the cube (labels, radial ranges).  ``rotations`` x
    ``translations``: the scan.  ``angles`` (degrees, one per rotation) default to a regular scan over
    ``angular_range`` (180 or 360).  ``channels``: half-open bin ranges ``[(start, stop), ...]``, or
    an int n = the n strongest peaks of the mean pattern (``peak_width`` bins either side), picked once
    ``min_rotations`` rotations are complete and kept.  ``center``: see the module docstring.
    ``device``: None or ``"auto"`` (an OpenCL GPU if there is one, else the CPU), ``"cpu"``,
    ``"opencl"`` (any OpenCL device, PoCL included), ``"gpu"``, or a device spec for
    :func:`pipeline.opencl.devices.find_device` (``"P:D"`` or part of a name); an OpenCL device that is
    missing or fails gives the CPU, with an event.  ``on_event(kind, text)``: ``"tomogram"`` (channels
    picked, centre estimated, back-projector chosen) and ``"tomogram-error"`` (failures; repeated ones
    at most every ``error_report_interval`` s).  ``on_update(tomogram_set)`` runs in the live thread
    after each update (keep it short).  ``size``, ``circle``, ``pad`` and ``min_row_fraction`` mean what they
    mean for :func:`pipeline.tomo.reconstruct`.

    Nothing raises into the caller after construction: failures are logged, counted in :attr:`stats`
    and reported through ``on_event``.
    """

    def __init__(self, radial: np.ndarray, rotations: int, translations: int, angles: np.ndarray | None = None, *,
                 angular_range: float = 180.0, channels: Sequence[tuple[int, int]] | int = 3,
                 filter_name: str = "ram-lak", center: float | str | None = None, device: str | None = None,
                 interval: float = 2.0, min_rotations: int = 4, size: int | None = None, circle: bool = False,
                 pad: str = "edge", min_row_fraction: float = 0.9, peak_width: int = 3,
                 radial_name: str = "radial", radial_units: str = "", max_busy_fraction: float = 0.5,
                 on_event: EventCallback | None = None, on_update: Callable[[LiveTomogramSet], None] | None = None,
                 error_report_interval: float = 30.0):
        self.radial = np.asarray(radial, np.float64)
        self.rotations, self.translations = int(rotations), int(translations)
        if self.rotations < 1 or self.translations < 2:
            raise ValueError("at least one rotation and two translations are needed")
        self.angular_range = float(angular_range)
        self.angles = (tomo.default_angles(self.rotations, self.angular_range) if angles is None
                       else np.asarray(angles, np.float64))
        if self.angles.shape != (self.rotations,):
            raise ValueError(f"{self.angles.size} angles for {self.rotations} rotations")
        nbins = self.radial.size
        if isinstance(channels, (int, np.integer)):
            if channels < 1:
                raise ValueError("channels must be >= 1 or a list of bin ranges")
            self._n_auto: int | None = int(channels)
            self._ranges: list[tuple[int, int]] | None = None
        else:
            ranges = [(int(a), int(b)) for a, b in channels]
            if not ranges or any(not 0 <= a < b <= nbins for a, b in ranges):
                raise ValueError(f"bin ranges must be non-empty half-open ranges within [0, {nbins}]")
            self._n_auto, self._ranges = None, ranges
        self.filter_name = tomo._filter_name(filter_name)  # validated now, not in the thread
        if isinstance(center, str) and center not in tomo.CENTER_METHODS:
            raise ValueError(f"unknown centre method {center!r}; choose one of {', '.join(tomo.CENTER_METHODS)}")
        self._center_method: str | None = None
        self._center: float | None = None
        if center is None or isinstance(center, str):
            self._center_method = center or "auto"
        else:
            self._center = float(center)
        if pad not in ("edge", "constant"):
            raise ValueError("pad must be 'edge' or 'constant'")
        self.device = device
        self.interval = max(0.0, float(interval))
        self.min_rotations = max(1, int(min_rotations))
        self.size = int(size or self.translations)
        self.circle, self.pad, self.min_row_fraction = bool(circle), pad, float(min_row_fraction)
        self.peak_width = int(peak_width)
        self.radial_name, self.radial_units = radial_name, radial_units
        self.max_busy_fraction = min(1.0, max(0.05, float(max_busy_fraction)))
        self.on_event, self.on_update = on_event, on_update
        self.error_report_interval = float(error_report_interval)

        self._snapshot: Snapshot | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._update_lock = threading.Lock()  # one update at a time (thread and update_now)
        self._lock = threading.Lock()  # guards latest and the counters; never held while calling out
        self._latest: LiveTomogramSet | None = None
        self._last_complete: np.ndarray | None = None
        self._engine: tuple[str, str | None] | None = None  # (reconstruct's engine, device) once resolved
        self._backprojector = "not chosen yet"
        self._last_report: tuple[str, float] = ("", 0.0)
        self._stats: dict = dict(updates=0, failures=0, checks=0, skipped=0, seconds_last=0.0, seconds_total=0.0,
                                 seconds_reconstruct_last=0.0, seconds_per_channel=0.0, rotations_complete=0,
                                 rotations_used=0, channels=0, center=None, center_estimated=False,
                                 last_error=None)

    # -- public ---------------------------------------------------------------------------------------

    @property
    def n_channels(self) -> int:
        """Channels the live tomogram will have (fixed: what :func:`create_live_datasets` needs up front)."""
        return self._n_auto if self._n_auto is not None else len(self._ranges or ())

    @property
    def bin_ranges(self) -> list[tuple[int, int]] | None:
        """The channels' bin ranges; None while peaks are still to be picked."""
        return None if self._ranges is None else list(self._ranges)

    @property
    def center(self) -> float | None:
        """The centre in use once given or estimated; None while the geometric centre stands in."""
        return self._center

    @property
    def latest(self) -> LiveTomogramSet | None:
        """The newest tomograms (a new object each update: safe to read from any thread), or None."""
        with self._lock:
            return self._latest

    @property
    def version(self) -> int:
        """Number of updates made: a writer compares it with the last one it wrote."""
        with self._lock:
            return int(self._stats["updates"])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> dict:
        """Counters and timings (a copy): updates, failures, checks, skipped (nothing new), seconds_last (whole
        update), seconds_mean, seconds_reconstruct_last, seconds_per_channel, rotations_complete,
        rotations_used (back-projected), channels, center, center_estimated, backprojector, last_error, running."""
        with self._lock:
            out = dict(self._stats)
        out["seconds_mean"] = out["seconds_total"] / out["updates"] if out["updates"] else 0.0
        out["backprojector"] = self._backprojector
        out["running"] = self.running
        return out

    def start(self, snapshot: Snapshot) -> None:
        """Launch the daemon thread that calls ``snapshot()`` every ``interval`` s (see the class docstring)."""
        self._snapshot = snapshot
        if self.running:
            logger.warning("live tomography already running; snapshot callable replaced")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="xrdct-live-tomo", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the thread to end (an update in progress is finished); True when it ended within ``timeout``."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def update_now(self, snapshot: Snapshot | None = None, force: bool = False) -> LiveTomogramSet | None:
        """Update synchronously (the end of the scan); returns :attr:`latest` (None if nothing yet or on failure).

        Without new complete rotations nothing is recomputed unless ``force``.  Waits for an update
        the thread may be making.  Never raises.
        """
        snap = snapshot or self._snapshot
        if snap is None:
            self._fail("update", RuntimeError("no snapshot callable given (start() or update_now(snapshot))"))
            return self.latest
        self._guarded(snap, force)
        return self.latest

    # -- the thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            t0 = time.monotonic()
            self._guarded(self._snapshot, force=False)
            busy = time.monotonic() - t0
            # rest at least busy * (1 / fraction - 1): a slow update never turns into a busy loop
            wait = max(self.interval - busy, busy * (1.0 / self.max_busy_fraction - 1.0), 0.01)

    def _guarded(self, snapshot: Snapshot | None, force: bool) -> None:
        try:
            with self._update_lock:
                self._update(snapshot, force)
        except Exception as exc:  # never into the caller's (or the pipeline's) thread
            self._fail("update", exc)

    def _update(self, snapshot: Snapshot | None, force: bool) -> None:
        t0 = time.perf_counter()
        with self._lock:
            self._stats["checks"] += 1
        try:
            cube, measured = snapshot()
        except Exception as exc:
            self._fail("snapshot", exc)
            return
        measured = None if measured is None else np.array(measured, copy=True)  # flags before data
        cube = np.asarray(cube)
        shape = (self.rotations, self.translations)
        if cube.ndim != 3 or cube.shape[:2] != shape or cube.shape[2] != self.radial.size:
            raise ValueError(f"snapshot cube has shape {cube.shape}; expected {shape + (self.radial.size,)}")
        if measured is None:  # no flags: a cell counts as done when its pattern is finite
            measured = np.isfinite(cube).any(axis=2)
        elif measured.shape != shape:
            raise ValueError(f"snapshot measured flags have shape {measured.shape}; expected {shape}")
        complete = (measured != 0).all(axis=1)
        n_complete = int(complete.sum())
        with self._lock:
            self._stats["rotations_complete"] = n_complete
            unchanged = self._latest is not None and self._last_complete is not None \
                and np.array_equal(complete, self._last_complete)
        if n_complete < self.min_rotations or (unchanged and not force):
            with self._lock:
                self._stats["skipped"] += 1
            return
        if self._ranges is None and not self._pick_channels(cube, complete):
            return
        ranges = list(self._ranges)
        sinos = tomo.channel_sinograms(cube, ranges)  # [channel, rotation, translation]
        sinos[:, ~complete] = np.nan
        if self._center is None and n_complete >= math.ceil(self.rotations / 2):
            self._estimate_center(sinos)
        center = self._center if self._center is not None else (self.translations - 1) / 2.0
        rec = self._reconstruct(sinos, center)
        estimated = self._center_method is not None and self._center is not None
        tset = LiveTomogramSet(rec, ranges, self.radial, self.radial_name, self.radial_units, sinos,
                               rotations_complete=n_complete, updated_time=time.time(), center_estimated=estimated)
        seconds = time.perf_counter() - t0
        with self._lock:
            s = self._stats
            s["updates"] += 1
            tset.update = s["updates"]
            s["seconds_last"] = seconds
            s["seconds_total"] += seconds
            s["seconds_reconstruct_last"] = rec.seconds
            s["seconds_per_channel"] = rec.seconds / max(1, len(ranges))
            s["rotations_used"] = rec.n_used
            s["channels"] = len(ranges)
            s["center"] = rec.center
            s["center_estimated"] = estimated
            self._latest = tset
            self._last_complete = complete
        if self.on_update is not None:
            try:
                self.on_update(tset)
            except Exception as exc:
                self._fail("on_update callback", exc)

    def _pick_channels(self, cube: np.ndarray, complete: np.ndarray) -> bool:
        """The n strongest peaks of the mean pattern of the complete rotations (cells with a full pattern)."""
        total = np.zeros(cube.shape[2], np.float64)
        count = 0
        for r in np.flatnonzero(complete):  # row by row: no float64 copy of the whole cube
            rows = np.asarray(cube[r], np.float64)
            good = np.isfinite(rows).all(axis=1)
            total += rows[good].sum(axis=0)
            count += int(good.sum())
        if count == 0:
            self._fail("channels", ValueError("no complete pattern yet to pick peaks from"))
            return False
        ranges = tomo.peak_bins((total / count)[None], n=self._n_auto, width=self.peak_width)
        if not ranges:
            self._fail("channels", ValueError("no peak found in the mean pattern yet"))
            return False
        self._ranges = ranges
        labels = tomo.TomogramSet(None, ranges, self.radial, self.radial_name, self.radial_units).labels()
        self._emit(EVENT_INFO, f"live tomograms of {len(ranges)} peak channels: {', '.join(labels)}")
        return True

    def _estimate_center(self, sinos: np.ndarray) -> None:
        try:
            c = tomo.estimate_center(sinos, self.angles, method=self._center_method,
                                     angular_range=self.angular_range, min_row_fraction=self.min_row_fraction)
        except Exception as exc:  # e.g. too few rows with signal: geometric centre meanwhile, retried next time
            self._fail("centre estimation", exc)
            return
        if not (np.isfinite(c) and 0.0 <= c <= self.translations - 1):
            self._fail("centre estimation", ValueError(f"estimate {c:.3f} outside the translation range"))
            return
        self._center = float(c)
        self._emit(EVENT_INFO, f"rotation axis at translation {c:.3f} ({self._center_method}, from "
                               f"{int(np.isfinite(sinos).all(axis=(0, 2)).sum())} rotations); kept for the scan")

    def _resolve_engine(self) -> tuple[str, str | None]:
        """(engine, device) for :func:`tomo.reconstruct`, chosen once (an OpenCL build takes a while)."""
        spec = (self.device or "auto").strip()
        key = spec.lower()
        engine: tuple[str, str | None] = ("cpu", None)
        backend = None
        if key in ("auto", "gpu"):
            backend = tomo.opencl_backprojector(None, gpu_only=True)
            engine = ("auto", None) if backend is not None else engine
        elif key == "opencl":
            backend = tomo.opencl_backprojector(None)
            engine = ("opencl", None) if backend is not None else engine
        elif key != "cpu":
            backend = tomo.opencl_backprojector(spec)
            engine = ("opencl", spec) if backend is not None else engine
        if backend is None and key not in ("cpu", "auto"):
            self._emit(EVENT_ERROR, f"no OpenCL device for {spec!r}: live tomograms back-projected on the CPU")
        self._backprojector = f"opencl: {backend.name}" if backend is not None else "cpu: scipy.sparse"
        if key != "cpu":
            self._emit(EVENT_INFO, f"live tomograms back-projected on {self._backprojector}")
        return engine

    def _reconstruct(self, sinos: np.ndarray, center: float) -> tomo.Reconstruction:
        if self._engine is None:
            self._engine = self._resolve_engine()
        engine, device = self._engine
        kwargs = dict(angular_range=self.angular_range, center=center, filter_name=self.filter_name, size=self.size,
                      pad=self.pad, circle=self.circle, min_row_fraction=self.min_row_fraction)
        if engine != "cpu":
            try:
                return tomo.reconstruct(sinos, self.angles, engine=engine, device=device, **kwargs)
            except Exception as exc:  # a device failure: the CPU from now on
                self._fail(f"OpenCL back-projection ({self._backprojector})", exc)
                self._engine = ("cpu", None)
                self._backprojector = "cpu: scipy.sparse (after an OpenCL failure)"
        return tomo.reconstruct(sinos, self.angles, engine="cpu", **kwargs)

    # -- reporting -------------------------------------------------------------------------------------

    def _emit(self, kind: str, text: str) -> None:
        logger.info("%s: %s", kind, text)
        if self.on_event is not None:
            try:
                self.on_event(kind, text)
            except Exception:  # a client's callback never breaks the live thread
                logger.exception("live tomography event callback failed")

    def _fail(self, where: str, exc: BaseException) -> None:
        text = f"live tomogram {where} failed: {_describe(exc)}"
        now = time.monotonic()
        with self._lock:
            self._stats["failures"] += 1
            self._stats["last_error"] = text
            last_text, last_time = self._last_report
            report = text != last_text or now - last_time >= self.error_report_interval
            if report:
                self._last_report = (text, now)
        if report:
            logger.warning("%s", text, exc_info=exc)  # the traceback once per new kind of failure
            if self.on_event is not None:
                try:
                    self.on_event(EVENT_ERROR, text)
                except Exception:
                    logger.exception("live tomography event callback failed")


# -- NeXus (SWMR) -----------------------------------------------------------------------------------------

LIVE_GROUP = "tomogram_live"
_LABEL_LEN = 96


@dataclass
class LiveDatasets:
    """The pre-created datasets of ``entry/tomogram_live`` (from :func:`create_live_datasets`)."""

    group: h5py.Group
    n_channels: int
    size: int
    radial_name: str
    n_rotations: int | None = None
    datasets: dict = field(default_factory=dict)
    writes: int = 0

    def __getitem__(self, key: str):
        return self.datasets[key]


def create_live_datasets(entry_group: h5py.Group, n_channels: int, size: int, radial_name: str, radial_units: str,
                         *, angles: np.ndarray | None = None, name: str = LIVE_GROUP) -> LiveDatasets:
    """Create the NXdata ``entry/<name>`` [channel, y, x], every dataset the live tomogram will fill.

    Must run before the file's ``swmr_mode`` is switched on: an SWMR writer cannot create objects
    (nor change attributes) afterwards, so everything that changes later is a dataset written in
    place: ``intensity`` (float32, NaN until written), ``bin_start``/``bin_stop`` and ``bin_range``,
    ``radial_start``/``radial_stop`` and ``<radial>_range`` (as :func:`pipeline.tomo.write_tomograms`),
    ``channel_label``, ``rotations_used`` [1], ``center`` [1] (also ``reconstruction_center``),
    ``updated_time`` [1] (written last), ``update_count`` [1], ``reconstruction_engine`` and
    ``reconstruction_filter``; with ``angles`` also ``rotation_angle``, ``rotation_used`` and
    ``rotation_weight`` [rotation].  Axes ``channel``, ``y``, ``x`` as in the final ``tomogram`` group
    (x, y in translation steps from the rotation axis).  Dynamic datasets are chunked: SWMR readers
    see their updates after ``refresh()``.
    """
    import h5py

    if entry_group.file.swmr_mode:
        raise RuntimeError("the file is already in SWMR mode: create the live tomogram datasets before "
                           "switching swmr_mode on")
    n, size = int(n_channels), int(size)
    if n < 1 or size < 1:
        raise ValueError("n_channels and size must be >= 1")
    g = entry_group.create_group(name)
    g.attrs.update(NX_class="NXdata", signal="intensity", axes=["channel", "y", "x"], interpretation="image",
                   channel_indices=0, y_indices=1, x_indices=2,
                   title="live filtered back-projection of the rotations measured so far")
    d: dict[str, h5py.Dataset] = {}

    def dyn(key: str, shape: tuple, dtype, fill, **attrs) -> None:
        d[key] = g.create_dataset(key, shape=shape, dtype=dtype, fillvalue=fill, chunks=shape)
        d[key].attrs.update(attrs)

    dyn("intensity", (n, size, size), np.float32, np.nan, units="sinogram units / translation step",
        long_name="reconstructed intensity per translation step (NaN: not reconstructed yet)")
    g.create_dataset("channel", data=np.arange(n, dtype=np.int64)).attrs.update(
        long_name="channel (bin range)", units="index")
    coord = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    for axis_name in ("y", "x"):
        g.create_dataset(axis_name, data=coord).attrs.update(
            units="translation step", long_name=f"{axis_name} from the rotation axis (translation steps)")
    bins_doc = "radial bins [start, stop) averaged into each channel"
    dyn("bin_range", (n, 2), np.int64, -1, units="bin index", long_name=bins_doc)
    dyn("bin_start", (n,), np.int64, -1, units="bin index", long_name="first radial bin of each channel")
    dyn("bin_stop", (n,), np.int64, -1, units="bin index", long_name="end radial bin (exclusive) of each channel")
    dyn(f"{radial_name}_range", (n, 2), np.float64, np.nan, units=radial_units,
        long_name=f"{radial_name} of the first and last bin of each channel")
    dyn("radial_start", (n,), np.float64, np.nan, units=radial_units,
        long_name=f"{radial_name} of the first bin of each channel")
    dyn("radial_stop", (n,), np.float64, np.nan, units=radial_units,
        long_name=f"{radial_name} of the last bin of each channel")
    dyn("channel_label", (n,), h5py.string_dtype("utf-8", _LABEL_LEN), b"")
    dyn("rotations_used", (1,), np.int64, 0, long_name="rotations back-projected in the current tomogram")
    dyn("center", (1,), np.float64, np.nan, units="translation step",
        long_name="rotation axis position on the translation axis")
    g["reconstruction_center"] = d["center"]  # the name the final tomogram group uses
    dyn("update_count", (1,), np.int64, 0, long_name="live updates written so far")
    dyn("updated_time", (1,), np.float64, np.nan, units="s since epoch",
        long_name="when the current tomogram was computed (written last)")
    dyn("reconstruction_engine", (1,), h5py.string_dtype("utf-8", 128), b"")
    dyn("reconstruction_filter", (1,), h5py.string_dtype("utf-8", 32), b"")
    n_rot = None
    if angles is not None:
        angles = np.asarray(angles, np.float64)
        n_rot = int(angles.size)
        g.create_dataset("rotation_angle", data=angles).attrs["units"] = "degree"
        dyn("rotation_used", (n_rot,), np.uint8, 0, meaning="1 = rotation measured and back-projected")
        dyn("rotation_weight", (n_rot,), np.float64, 0.0)
    return LiveDatasets(g, n, size, radial_name, n_rot, d)


def _padded(values: np.ndarray, n: int, fill) -> np.ndarray:
    out = np.full((n,) + values.shape[1:], fill, dtype=values.dtype)
    k = min(n, values.shape[0])
    out[:k] = values[:k]
    return out


def write_live(handle: LiveDatasets, tomograms: tomo.TomogramSet | None) -> None:
    """Write ``tomograms`` into the pre-created datasets and flush each (SWMR readers then ``refresh()``).

    Images first, ``updated_time`` last.  Channels beyond ``n_channels`` are dropped (logged), missing
    ones stay NaN.  h5py I/O holds the GIL: call it from the thread that owns the file (the writer),
    e.g. when :attr:`LiveTomography.version` has changed.  Raises ValueError when the image size
    differs, OSError/RuntimeError from HDF5.
    """
    if tomograms is None:
        return
    rec = tomograms.reconstruction
    images = np.asarray(rec.images, np.float32)
    n, size = handle.n_channels, handle.size
    if images.ndim != 3 or images.shape[1:] != (size, size):
        raise ValueError(f"tomogram images {images.shape} do not fit the live datasets [{n}, {size}, {size}]")
    if images.shape[0] > n:
        logger.warning("live tomogram has %d channels; the file holds %d", images.shape[0], n)
    k = min(n, images.shape[0])
    ds = handle.datasets
    written = []

    def put(key: str, value) -> None:
        ds[key][...] = value
        written.append(ds[key])

    put("intensity", _padded(images, n, np.nan))
    ranges = np.array(tomograms.bin_ranges[:k], np.int64).reshape(k, 2)
    ranges = _padded(ranges, n, -1)
    put("bin_range", ranges)
    put("bin_start", ranges[:, 0])
    put("bin_stop", ranges[:, 1])
    rr = tomograms.radial_ranges()
    rr = np.full((n, 2), np.nan) if rr is None else _padded(np.asarray(rr[:k], np.float64).reshape(k, 2), n, np.nan)
    put(f"{handle.radial_name}_range", rr)
    put("radial_start", rr[:, 0])
    put("radial_stop", rr[:, 1])
    labels = [s.encode("utf-8")[:_LABEL_LEN] for s in tomograms.labels()[:k]] + [b""] * (n - k)
    put("channel_label", np.array(labels, dtype=ds["channel_label"].dtype))
    if handle.n_rotations is not None and rec.weights.shape == (handle.n_rotations,):
        put("rotation_used", rec.rows_used.astype(np.uint8))
        put("rotation_weight", np.asarray(rec.weights, np.float64))
    put("rotations_used", [rec.n_used])
    put("center", [rec.center])
    put("reconstruction_engine", [rec.engine.encode("utf-8")[:128]])
    put("reconstruction_filter", [rec.filter_name.encode("utf-8")])
    handle.writes += 1
    put("update_count", [handle.writes])
    for dataset in written:
        dataset.flush()
    put("updated_time", [float(getattr(tomograms, "updated_time", time.time()))])  # last: the rest is on disk before it
    ds["updated_time"].flush()
