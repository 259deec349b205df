"""Resuming a scan after a crash or a restart: nothing lost, nothing reduced twice.

The interrupted file is never modified: it is renamed aside (``NAME.interrupted-N.h5``), its reduced
rows are read back (SWMR readers may open a file whose writer was killed), and they are copied into
the new file before the reduction goes on with the frames that are not reduced yet.  Frames that were
missing or failed are tried again: they may have landed since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .config import ReductionConfig
from .nexus import STATUS_OK
from .results import FrameResult
from .scan import ScanModel

# settings that change the numbers: a file made with others cannot be continued
_RESULT_KEYS = ("poni_text", "mask_path", "bins", "unit", "split", "polarization", "solid_angle", "dummy",
                "delta_dummy", "error_model", "radial_range")


class ResumeError(ValueError):
    """The previous file cannot be continued (other settings, other scan, unreadable)."""


@dataclass
class Carried:
    """Rows of an interrupted run, ready to be written into the new file."""

    previous: Path
    frames: np.ndarray
    rows: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    sources: list[str]
    landed: np.ndarray

    def results(self):
        """(row, frame, FrameResult, source, landed) for each reduced frame, in row order."""
        zeros = np.zeros(self.intensity.shape[1], np.float32)
        for i in np.argsort(self.rows):
            sigma = self.sigma[i] if np.isfinite(self.sigma[i]).any() else None
            yield (int(self.rows[i]), int(self.frames[i]), FrameResult(self.intensity[i], sigma, zeros),
                   self.sources[i], float(self.landed[i]))


def _aside(path: Path) -> Path:
    for n in range(1, 10_000):
        target = path.with_name(f"{path.stem}.interrupted-{n}{path.suffix}")
        if not target.exists():
            return target
    raise ResumeError(f"too many interrupted copies of {path}")


def recover(path: str | Path, config: ReductionConfig, scan: ScanModel) -> Carried | None:
    """Move an interrupted output aside and read back what it holds; None when there is no file."""
    path = Path(path)
    if not path.exists():
        return None
    from .nexus import held_broken

    source = path
    if held_broken(path):
        # this process still holds the file from a failed write and HDF5 must not open it twice: read a copy
        # (the original name goes only once the copy has been checked)
        import shutil

        source = _aside(path)
        try:
            shutil.copyfile(path, source)
        except OSError as exc:
            source.unlink(missing_ok=True)
            raise ResumeError(f"cannot resume from {path}: copying it aside failed ({exc})") from exc
    try:
        return _recover(path, source, config, scan)
    except BaseException:
        if source is not path:
            source.unlink(missing_ok=True)
        raise


def _recover(path: Path, source: Path, config: ReductionConfig, scan: ScanModel) -> Carried:
    try:
        with h5py.File(source, "r", swmr=True) as f:
            stored = json.loads(f["entry/reduction/configuration"][()])
            stored_scan = json.loads(f["entry/reduction/scan"][()])
            data = f["entry/integrated"]
            status = data["frame_status"][()]
            frames = data["frame_number"][()]
            done = np.flatnonzero(status == STATUS_OK)
            intensity = data["intensity"][()][done] if done.size else np.zeros((0, config.bins), np.float32)
            sigma = data["intensity_errors"][()][done] if done.size else intensity.copy()
            sources = [s.decode() if isinstance(s, bytes) else str(s) for s in data["source_file"][()][done]]
            landed = data["landed_time"][()][done]
    except (OSError, KeyError, ValueError) as exc:
        raise ResumeError(f"cannot resume from {path}: {exc}") from exc
    current = config.to_dict()
    changed = [k for k in _RESULT_KEYS if json.dumps(stored.get(k)) != json.dumps(current.get(k))]
    if changed:
        raise ResumeError(f"cannot resume from {path}: it was reduced with other settings ({', '.join(changed)})")
    if (stored_scan.get("rotations"), stored_scan.get("translations")) != (scan.rotations, scan.translations):
        raise ResumeError(f"cannot resume from {path}: it holds a {stored_scan.get('rotations')}x"
                          f"{stored_scan.get('translations')} scan, not {scan.rotations}x{scan.translations}")
    index_of = {f: i for i, f in enumerate(scan.frames())}
    frames_done = frames[done]
    rows = np.array([index_of.get(int(f), -1) for f in frames_done], dtype=np.int64)
    if (rows < 0).any():
        raise ResumeError(f"cannot resume from {path}: it holds frames outside the scan")
    if len(set(frames_done.tolist())) != len(frames_done):
        raise ResumeError(f"cannot resume from {path}: a frame appears twice in it")
    if source is path:
        previous = _aside(path)
        path.rename(previous)
    else:
        previous = source
        path.unlink()
    return Carried(previous, frames_done, rows, intensity, sigma, sources, landed)
