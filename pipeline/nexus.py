"""NeXus/HDF5 output, written in SWMR mode so that a viewer can watch it grow.

Layout (``default`` attributes lead a viewer from the root to the patterns)::

    /entry                 NXentry   @default=integrated
      integrated           NXdata    @signal=intensity @axes=[".", <radial>]
        intensity          float32 [frame, bin]   NaN where a frame is missing or failed
        intensity_errors   float32 [frame, bin]   (also linked as ``sigma``)
        <radial>           float64 [bin]  @units
        frame_number, frame_status, source_file, landed_time
      sinogram             NXdata    @signal=intensity @axes=[rotation, translation, <radial>]
        intensity          float32 [rotation, translation, bin], NaN where not (yet) measured
        measured           uint8   [rotation, translation] (1 = reduced, 2 = missing, 3 = failed)
      reduction            NXprocess: program, version, configuration (JSON), PONI, library versions
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .results import FrameResult
from .scan import ScanModel

logger = logging.getLogger(__name__)

STATUS_PENDING, STATUS_OK, STATUS_MISSING, STATUS_FAILED = 0, 1, 2, 3

# Writers whose file failed to write (a full disk): HDF5 (1.14/2.0 through h5py) crashes when it frees or
# closes such a file, even from the garbage collector, so they are kept alive and never closed; at exit the
# process leaves without HDF5's clean-up (see leave_without_hdf5_cleanup).
_UNCLOSABLE: list = []
_UNCLOSABLE_FILES: set[tuple[int, int]] = set()  # (st_dev, st_ino) of those files


def _keep_unclosable(writer) -> None:
    import atexit

    if not _UNCLOSABLE:
        atexit.register(leave_without_hdf5_cleanup)  # after h5py's own exit handler is registered: runs first
    _UNCLOSABLE.append(writer)
    try:
        st = os.stat(writer.path)
        _UNCLOSABLE_FILES.add((st.st_dev, st.st_ino))
    except OSError:
        pass


def held_broken(path: str | Path) -> bool:
    """True when this process holds ``path`` open from a failed write (it must not be opened again)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _UNCLOSABLE_FILES


def leave_without_hdf5_cleanup(code: int = 0) -> None:
    """End the process now if an output file failed: HDF5's exit clean-up would crash on it.

    Called by the CLI with its exit status; as an exit handler (a device server shutting down) it ends
    with status 0, the failure having been reported when it happened."""
    if _UNCLOSABLE:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class OutputError(OSError):
    """The output file could not be written (``full``: the disk is full); the message says what is safe."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(errno.ENOSPC if full else errno.EIO, message)
        self.full = full

    def __str__(self) -> str:
        return self.strerror
_RADIAL_NAMES = {"q_nm^-1": ("q", "1/nm"), "q_A^-1": ("q", "1/angstrom"), "2th_deg": ("two_theta", "degree")}
_STR = h5py.string_dtype("utf-8", 512)


def radial_name(unit: str) -> tuple[str, str]:
    """(dataset name, NeXus units) of the radial axis for a pyFAI unit."""
    return _RADIAL_NAMES[unit]


def library_versions() -> dict[str, str]:
    import fabio
    import pyFAI

    return {"xrdct": __version__, "pyFAI": pyFAI.version, "fabio": fabio.version, "numpy": np.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version}


class NexusWriter:
    """Owns the output file; one thread writes, and rows are flushed in blocks."""

    def __init__(self, path: str | Path, radial: np.ndarray, unit: str, scan: ScanModel,
                 config_json: str, poni_text: str, engine: str, flush_interval: float = 0.5,
                 extra_info: dict | None = None, live=None):
        """``live``: a :class:`~pipeline.live_tomo.LiveTomography` whose tomograms the file keeps up to date."""
        self.path = Path(path)
        self.scan = scan
        self.nbins = int(radial.shape[0])
        self.flush_interval = flush_interval
        self._last_flush = time.monotonic()
        self._dirty_rot: dict[int, tuple[int, int]] = {}
        self.sinogram = np.full((scan.rotations, scan.translations, self.nbins), np.nan, dtype=np.float32)
        self.measured = np.zeros((scan.rotations, scan.translations), dtype=np.uint8)
        self.n_rows = 0
        self.committed = 0  # frames whose data and status are on disk
        self._committed_before_block = 0
        self.failed: OutputError | None = None
        self.live = live
        self._live_handle = None
        self._live_version = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.path, "w", libver="latest")
        self._create(radial, unit, config_json, poni_text, engine, extra_info or {})
        self.file.swmr_mode = True
        self.file.flush()

    def _create(self, radial, unit, config_json, poni_text, engine, extra_info) -> None:
        f = self.file
        f.attrs.update(NX_class="NXroot", default="entry", creator=f"xrdct {__version__}",
                       file_name=self.path.name, file_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       HDF5_Version=h5py.version.hdf5_version)
        entry = f.create_group("entry")
        entry.attrs.update(NX_class="NXentry", default="integrated")
        entry.create_dataset("title", data=f"XRD-CT reduction {self.path.stem}")
        entry.create_dataset("start_time", data=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        entry.create_dataset("end_time", shape=(), dtype=_STR)
        rname, runits = radial_name(unit)
        self.radial_name = rname

        data = entry.create_group("integrated")
        data.attrs.update(NX_class="NXdata", signal="intensity", axes=[".", rname], interpretation="spectrum")
        data.attrs[f"{rname}_indices"] = 1
        chunk_rows = max(1, min(64, (1 << 20) // (4 * self.nbins)))
        make = dict(shape=(0, self.nbins), maxshape=(None, self.nbins), chunks=(chunk_rows, self.nbins),
                    dtype=np.float32, fillvalue=np.nan)
        self.intensity = data.create_dataset("intensity", **make)
        self.intensity.attrs.update(long_name="azimuthally averaged intensity", units="counts/sr-normalised")
        self.errors = data.create_dataset("intensity_errors", **make)
        self.errors.attrs["long_name"] = "standard error of the mean (Poisson)"
        data["sigma"] = self.errors
        axis = data.create_dataset(rname, data=np.asarray(radial, dtype=np.float64))
        axis.attrs.update(units=runits, long_name=f"{rname} ({runits})")
        vec = dict(shape=(0,), maxshape=(None,), chunks=(1024,))
        self.frame_number = data.create_dataset("frame_number", dtype=np.int64, fillvalue=-1, **vec)
        self.status = data.create_dataset("frame_status", dtype=np.uint8, fillvalue=STATUS_PENDING, **vec)
        self.status.attrs["meaning"] = "0 pending, 1 reduced, 2 missing, 3 failed"
        self.source_file = data.create_dataset("source_file", dtype=_STR, **vec)
        self.landed = data.create_dataset("landed_time", dtype=np.float64, fillvalue=np.nan, **vec)
        self.landed.attrs["units"] = "s since epoch"

        sino = entry.create_group("sinogram")
        sino.attrs.update(NX_class="NXdata", signal="intensity", axes=["rotation", "translation", rname])
        sino.attrs.update(rotation_indices=0, translation_indices=1)
        sino.attrs[f"{rname}_indices"] = 2
        self.sino_ds = sino.create_dataset(
            "intensity", shape=self.sinogram.shape, dtype=np.float32, fillvalue=np.nan,
            chunks=(1, self.scan.translations, self.nbins) if self.scan.translations * self.nbins * 4 < (8 << 20)
            else (1, 1, self.nbins))
        self.measured_ds = sino.create_dataset("measured", data=self.measured)
        self.measured_ds.attrs["meaning"] = "0 not yet, 1 reduced, 2 missing, 3 failed"
        rot = sino.create_dataset("rotation", data=np.arange(self.scan.rotations))
        rot.attrs.update(units="index", long_name="rotation step")
        tr = sino.create_dataset("translation", data=np.arange(self.scan.translations))
        tr.attrs.update(units="index", long_name="translation step")
        sino_axis = sino.create_dataset(rname, data=np.asarray(radial, dtype=np.float64))
        sino_axis.attrs["units"] = runits

        proc = entry.create_group("reduction")
        proc.attrs["NX_class"] = "NXprocess"
        proc.create_dataset("program", data="xrdct")
        proc.create_dataset("version", data=__version__)
        proc.create_dataset("date", data=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        proc.create_dataset("engine", data=engine)
        proc.create_dataset("configuration", data=config_json)
        proc.create_dataset("poni", data=poni_text)
        scan_info = {"rotations": self.scan.rotations, "translations": self.scan.translations,
                     "order": self.scan.order, "first_frame": self.scan.first_frame}
        if self.scan.positions is not None:  # explicit positions override the order: keep them
            scan_info["positions"] = [[f, r, t] for f, (r, t) in sorted(self.scan.positions.items())]
        proc.create_dataset("scan", data=json.dumps(scan_info))
        versions = proc.create_group("versions")
        versions.attrs["NX_class"] = "NXnote"
        for key, value in library_versions().items():
            versions.create_dataset(key, data=str(value))
        for key, value in extra_info.items():
            proc.create_dataset(key, data=str(value))
        if self.live is not None:  # an SWMR file cannot create datasets later: make them now
            from .live_tomo import create_live_datasets

            self._live_handle = create_live_datasets(entry, self.live.n_channels, self.live.size, rname, runits,
                                                     angles=self.live.angles)

    # -- writing ------------------------------------------------------------
    BLOCK = 1024  # rows buffered in memory between writes

    def _new_block(self, start: int) -> None:
        n, nb = self.BLOCK, self.nbins
        self._committed_before_block = self.committed
        self._start = start
        self._fill = 0  # rows [start, start + fill) are held; the rest of the block is NaN
        self._inten = np.full((n, nb), np.nan, np.float32)
        self._err = np.full((n, nb), np.nan, np.float32)
        self._frames = np.full(n, -1, np.int64)
        self._status = np.zeros(n, np.uint8)
        self._sources = np.zeros(n, dtype=_STR)
        self._landed = np.full(n, np.nan)

    def add(self, index: int, frame: int, result: FrameResult | None, status: int, source: str = "",
            landed: float = float("nan")) -> None:
        """Record frame ``frame`` at row ``index``.  Rows come in order; they are written in blocks."""
        if not hasattr(self, "_start"):
            self._new_block(index)
        k = index - self._start
        if not 0 <= k < self.BLOCK or k < self._fill - 1:  # outside this block (or a row going back)
            self.flush()
            self._new_block(index)
            k = 0
        if result is not None:
            self._inten[k] = result.intensity
            if result.sigma is not None:
                self._err[k] = result.sigma
        self._frames[k], self._status[k], self._landed[k] = frame, status, landed
        self._sources[k] = source.encode("utf-8", "replace")[:512]
        self._fill = max(self._fill, k + 1)
        try:
            rot, trans = self.scan.position(frame)
        except KeyError:
            rot = None
        if rot is not None:
            if result is not None:
                self.sinogram[rot, trans] = result.intensity
            self.measured[rot, trans] = status
            span = self._dirty_rot.get(rot)
            self._dirty_rot[rot] = (trans, trans) if span is None else (min(span[0], trans), max(span[1], trans))
        if self._fill == self.BLOCK or time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()
            if self._fill == self.BLOCK:
                self._new_block(self._start + self.BLOCK)

    def flush(self) -> None:
        """Write the buffered rows and dirty sinogram lines, then let SWMR readers see them.

        Data go to disk before the status that declares them reduced: if the disk fills up in between,
        the file never says "reduced" over a missing pattern (a resume then simply redoes those frames).
        Write errors are raised as :class:`OutputError` with the number of frames safely written.
        """
        if self.failed is not None:
            raise self.failed
        try:
            self._flush()
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: BaseException) -> OutputError:
        """Record a write failure as the OutputError that says what is safe and what to do."""
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
        what = "the output disk is full" if full else f"writing the output failed ({exc})"
        self.failed = OutputError(
            f"{what}: {self.path}; {self.committed} frames are safely written and readable, the frames "
            "after them are not. Free space (or fix the cause), then resume the scan (xrdct reduce "
            "--resume, or Reset and Start with the same name on the device).", full=full)
        return self.failed

    def _flush(self) -> None:
        if getattr(self, "_fill", 0):
            start, n = self._start, self._fill
            stop = start + n
            if stop > self.n_rows:
                for ds in (self.intensity, self.errors):
                    ds.resize((stop, self.nbins))
                for ds in (self.frame_number, self.status, self.source_file, self.landed):
                    ds.resize((stop,))
                self.n_rows = stop
            held = self._frames[:n] >= 0  # rows of this block not given (yet) keep what the file has
            rows = [(slice(start, stop), slice(0, n))] if held.all() else \
                [(start + int(k), int(k)) for k in np.flatnonzero(held)]
            for dst, src in rows:  # first the data...
                self.intensity[dst] = self._inten[src]
                self.errors[dst] = self._err[src]
                self.frame_number[dst] = self._frames[src]
                self.source_file[dst] = self._sources[src]
                self.landed[dst] = self._landed[src]
            self.file.flush()
            for dst, src in rows:  # ...then the status that says they are there
                self.status[dst] = self._status[src]
        if self._dirty_rot:
            for rot, (lo, hi) in sorted(self._dirty_rot.items()):  # only the cells that changed
                self.sino_ds[rot, lo:hi + 1] = self.sinogram[rot, lo:hi + 1]
                self.measured_ds[rot, lo:hi + 1] = self.measured[rot, lo:hi + 1]
            self._dirty_rot.clear()
        if self._live_handle is not None and self.live.version != self._live_version:
            from .live_tomo import write_live

            self._live_version = self.live.version
            write_live(self._live_handle, self.live.latest)
        self.file.flush()
        if getattr(self, "_fill", 0):
            self.committed = max(self.committed, int((self._status[: self._fill] != STATUS_PENDING).sum())
                                 + self._committed_before_block)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close; after a write failure, close what can be closed and keep the first error."""
        if not self.file or any(w is self for w in _UNCLOSABLE):
            return
        failed_before = self.failed is not None
        if not failed_before:
            try:
                self.flush()
                self.file["entry/end_time"][()] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                self.file.flush()
            except OutputError:
                pass  # self.failed says what happened
            except (OSError, RuntimeError, ValueError) as exc:  # the end time could not be written
                self._failure(exc)
        if self.failed is not None:
            # what was flushed before the failure is on disk and readable by others; HDF5 cannot close this
            # handle (and crashes trying, now or at garbage collection): keep it open for the process's life
            logger.warning("%s: left open after the write failure (HDF5 cannot close it safely)", self.path)
            _keep_unclosable(self)
            if not failed_before:
                raise self.failed
            return
        self.file.close()
