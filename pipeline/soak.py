"""Soak test: a simulated detector writes frames at a fixed rate for minutes; every one must come out once.

A player thread writes CBF files at ``rate`` frames/s into a landing directory while a live
:class:`~pipeline.runner.Reducer` reduces them into a NeXus file, as a beamline does all day.  Every
second the run samples the resident memory of the process, the reducer's backlog, latency and
throughput.  At the end the NeXus file is checked row by row:

* every frame sent is there once, in order, with status "reduced" (lost, duplicated, out of order);
* each pattern equals the pattern of the image that frame was made from, reduced by the same engine
  beforehand (a mix-up of staging buffers or a corrupted frame would show here);
* resident memory after warm-up stays flat, and latency does not creep up.

The frames are ``distinct`` different images cycled (generating a new image per frame would cost
more than reducing it); 17 shares no factor with the batch sizes, so a frame mixed up with another
of its batch or of an earlier batch in the same staging memory shows as a wrong pattern.
Files already written to the NeXus file are deleted as they go, as a data
mover would, so that a long run needs little disk (``keep_files`` keeps them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import ReductionConfig
from .scan import ScanModel

logger = logging.getLogger(__name__)

DETECTORS = {"pilatus2m": ((1679, 1475), "Pilatus CdTe 2M"), "pilatus300k": ((619, 487), "Pilatus CdTe 300k")}


def rss_mb() -> float:
    """Resident memory of this process (MB), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def make_frames(poni_text: str, distinct: int, seed: int = 11) -> list[bytes]:
    """``distinct`` CBF files of ring patterns with gaps (-1), bad pixels (-2) and 16/32-bit escapes."""
    import fabio.cbfimage

    from .geometry import make_integrator

    ai = make_integrator(poni_text)
    shape = ai.detector.shape
    q = ai.qArray(shape).astype(np.float32)
    gaps = ai.detector.mask.astype(bool) if ai.detector.mask is not None else np.zeros(shape, bool)
    rng = np.random.default_rng(seed)
    blobs = []
    for k in range(distinct):
        rings = np.exp(-((q % 6.0 - 3.0) ** 2) / 0.02) * (150.0 + 50.0 * k)
        data = rng.poisson(4.0 + rings).astype(np.int32)
        hot = rng.integers(0, data.size, 200)
        data.flat[hot[:100]] = 40_000  # 16-bit escapes
        data.flat[hot[100:]] = 3_000_000  # 32-bit escapes
        data[gaps] = -1
        data.flat[rng.integers(0, data.size, 50)] = -2
        with tempfile.NamedTemporaryFile(suffix=".cbf", delete=False) as tmp:
            name = tmp.name
        try:
            fabio.cbfimage.CbfImage(data=data).write(name)
            blobs.append(Path(name).read_bytes())
        finally:
            os.unlink(name)
    return blobs


@dataclass
class Sample:
    t: float
    written: int
    reduced: int
    backlog: int
    latency: float
    throughput: float
    rss_mb: float


@dataclass
class SoakReport:
    seconds: float
    rate: float
    detector: str
    engine: str
    frames_sent: int = 0
    frames_reduced: int = 0
    frames_missing: int = 0
    frames_failed: int = 0
    frames_lost: int = 0
    frames_duplicated: int = 0
    out_of_order: int = 0
    pattern_mismatches: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_growth_pct: float = 0.0
    latency_start_s: dict = field(default_factory=dict)
    latency_end_s: dict = field(default_factory=dict)
    throughput_mean: float = 0.0
    backlog_max: int = 0
    state: str = ""
    live_tomogram: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.frames_lost == 0 and self.frames_duplicated == 0 and self.out_of_order == 0
                and self.pattern_mismatches == 0 and self.frames_failed == 0 and self.frames_missing == 0
                and self.state == "done" and self.rss_growth_pct <= 5.0)

    def summary(self) -> str:
        ok = "PASSED" if self.passed else "FAILED"
        return (f"soak {ok}: {self.seconds:.0f} s at {self.rate:g} fps ({self.detector}, {self.engine}): "
                f"sent {self.frames_sent}, reduced {self.frames_reduced}, missing {self.frames_missing}, "
                f"failed {self.frames_failed}, lost {self.frames_lost}, duplicated {self.frames_duplicated}, "
                f"out of order {self.out_of_order}, wrong patterns {self.pattern_mismatches}; "
                f"RSS {self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MB ({self.rss_growth_pct:+.1f} %, max "
                f"{self.rss_max_mb:.0f}); latency p50/p99 first {self._lat(self.latency_start_s)}, last "
                f"{self._lat(self.latency_end_s)}; backlog max {self.backlog_max}"
                + (f"; live tomogram: {self.live_tomogram.get('updates')} updates, "
                   f"{self.live_tomogram.get('seconds_mean', 0):.2f} s each ({self.live_tomogram.get('backprojector')})"
                   if self.live_tomogram else ""))

    @staticmethod
    def _lat(d: dict) -> str:
        return f"{d.get('p50', float('nan')) * 1e3:.0f}/{d.get('p99', float('nan')) * 1e3:.0f} ms"


def _window(samples: list[Sample], lo: float, hi: float) -> list[Sample]:
    return [s for s in samples if lo <= s.t <= hi]


def run_soak(seconds: float = 600.0, rate: float = 250.0, detector: str = "pilatus300k", engine: str = "auto",
             workdir: str | Path | None = None, distinct: int = 17, bins: int = 1000, keep_files: bool = False,
             translations: int = 100, readers: int | None = None, live_tomogram: int = 0,
             log=print) -> SoakReport:
    """Run the soak and check the output; see the module docstring."""
    from .cbf import parse_frame
    from .engines import make_engine
    from .geometry import build_setup
    from .nexus import STATUS_OK
    from .runner import Reducer
    from .simulate import make_poni_text, write_frame

    shape, name = DETECTORS[detector]
    poni = make_poni_text(shape, name)
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="xrdct-soak-"))
    landing, output = base / "landing", base / "soak.h5"
    shutil.rmtree(landing, ignore_errors=True)
    landing.mkdir(parents=True)
    output.unlink(missing_ok=True)
    n_frames = int(math.ceil(seconds * rate))
    scan = ScanModel(int(math.ceil(n_frames / translations)), translations)
    n_frames = scan.n_frames
    blobs = make_frames(poni, distinct)
    config = ReductionConfig(poni_text=poni, bins=bins, engine=engine)
    setup = build_setup(config)
    eng = make_engine(setup, config)
    expected = eng.integrate_batch([parse_frame(b) for b in blobs])
    log(f"soak: {n_frames} frames ({shape[0]}x{shape[1]}, {len(blobs[0]) / 1e6:.2f} MB each) at {rate:g} fps "
        f"into {landing}; engine {eng.description}")

    live = {"channels": live_tomogram, "interval": 2.0} if live_tomogram else None
    written_order: list[int] = []  # frames as the writer took them: duplicates and order show here
    reducer = Reducer(config, landing, output, scan=scan, live=True, missing_timeout=10.0, setup=setup,
                      engine=eng, readers=readers, live_tomogram=live,
                      on_result=lambda frame, result: written_order.append(frame))
    stop = threading.Event()
    written = [0]

    def player() -> None:
        t0 = time.perf_counter()
        for i in range(n_frames):
            if stop.is_set():
                return
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            # written in place, as the detector does: the reducer sees files that are still growing
            write_frame(landing / f"frame_{i:07d}.cbf", blobs[i % distinct])
            written[0] += 1

    def cleaner() -> None:
        """Delete frames already written to the NeXus file (a data mover's job)."""
        removed = 0
        while not stop.is_set():
            stop.wait(1.0)
            last = reducer.snapshot().last_frame
            while removed <= last:
                (landing / f"frame_{removed:07d}.cbf").unlink(missing_ok=True)
                removed += 1

    samples: list[Sample] = []
    reducer.start()
    threads = [threading.Thread(target=player, name="soak-player", daemon=True)]
    if not keep_files:
        threads.append(threading.Thread(target=cleaner, name="soak-cleaner", daemon=True))
    t0 = time.time()
    for t in threads:
        t.start()
    next_log = t0 + 30
    try:
        while reducer.running:
            time.sleep(1.0)
            m = reducer.snapshot()
            now = time.time()
            samples.append(Sample(round(now - t0, 2), written[0], m.frames_processed, m.backlog, m.latency,
                                  m.throughput, rss_mb()))
            if now >= next_log:
                s = samples[-1]
                log(f"  {s.t:6.0f} s: sent {s.written}, reduced {s.reduced}, backlog {s.backlog}, "
                    f"latency {s.latency * 1e3:.0f} ms, {s.throughput:.0f} fps, RSS {s.rss_mb:.0f} MB")
                next_log = now + 30
            if written[0] >= n_frames and m.frames_processed + m.frames_missing + m.frames_failed >= n_frames:
                break
            if now - t0 > seconds * 1.5 + 120:
                log("soak: the reduction did not finish in time; stopping it")
                break
    finally:
        stop.set()
        reducer.stop(timeout=120)
        for t in threads:
            t.join(timeout=10)
        if hasattr(eng, "close"):
            eng.close()
    m = reducer.snapshot()
    report = SoakReport(seconds=seconds, rate=rate, detector=detector, engine=eng.description, state=m.state)
    if reducer.live_tomo is not None:
        report.live_tomogram = {k: v for k, v in reducer.live_tomo.stats.items() if k != "last_error"}
    report.frames_sent = written[0]
    _check_output(report, output, n_frames, expected, distinct, STATUS_OK)
    # the file has one row per frame (a frame written twice would overwrite its row): count the writes
    report.frames_duplicated = len(written_order) - len(set(written_order))
    report.out_of_order = sum(1 for a, b in zip(written_order, written_order[1:]) if b <= a)
    report.frames_missing, report.frames_failed = m.frames_missing, m.frames_failed
    _summarise_samples(report, samples, seconds)
    if not keep_files and workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return report


def _check_output(report: SoakReport, output: Path, n_frames: int, expected: list, distinct: int,
                  status_ok: int) -> None:
    import h5py

    with h5py.File(output, "r") as f:
        g = f["entry/integrated"]
        frames = g["frame_number"][()]
        status = g["frame_status"][()]
        ok_rows = np.flatnonzero(status == status_ok)
        report.frames_reduced = int(ok_rows.size)
        numbers, counts = np.unique(frames[frames >= 0], return_counts=True)
        report.frames_duplicated = int((counts - 1).sum())
        report.out_of_order = int((np.diff(frames[frames >= 0]) <= 0).sum())
        reduced = set(frames[ok_rows].tolist())
        report.frames_lost = sum(1 for i in range(report.frames_sent) if i not in reduced)
        mismatches = 0
        intensity = g["intensity"]
        for start in range(0, ok_rows.size, 4096):  # compare in blocks: the file can hold GBs
            rows = ok_rows[start:start + 4096]
            block = intensity[rows[0]:rows[-1] + 1][rows - rows[0]]
            for row, pattern in zip(rows, block):
                ref = expected[int(frames[row]) % distinct]
                if isinstance(ref, BaseException) or not np.allclose(pattern, ref.intensity, rtol=1e-6,
                                                                     atol=0, equal_nan=True):
                    mismatches += 1
        report.pattern_mismatches = mismatches


def _summarise_samples(report: SoakReport, samples: list[Sample], seconds: float) -> None:
    if not samples:
        return
    end = samples[-1].t
    warm = min(60.0, 0.1 * end)  # warm-up: caches, pools and the first HDF5 chunks
    first = _window(samples, warm, warm + max(10.0, 0.1 * end))
    last = _window(samples, end - max(10.0, 0.1 * end), end)
    first = first or samples[:1]
    last = last or samples[-1:]
    report.rss_start_mb = float(np.median([s.rss_mb for s in first]))
    report.rss_end_mb = float(np.median([s.rss_mb for s in last]))
    report.rss_max_mb = float(max(s.rss_mb for s in samples))
    report.rss_growth_pct = 100.0 * (report.rss_end_mb - report.rss_start_mb) / max(report.rss_start_mb, 1e-9)

    def lat(window: list[Sample]) -> dict:
        values = [s.latency for s in window if s.latency > 0]
        if not values:
            return {}
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
                "max": float(max(values))}

    report.latency_start_s, report.latency_end_s = lat(first), lat(last)
    steady = [s.throughput for s in samples if warm <= s.t <= end - 5]
    report.throughput_mean = float(np.mean(steady)) if steady else 0.0
    report.backlog_max = int(max(s.backlog for s in samples))
    report.samples = [asdict(s) for s in samples]


def main(args) -> int:
    report = run_soak(seconds=args.minutes * 60, rate=args.rate, detector=args.detector, engine=args.engine,
                      workdir=args.workdir, bins=args.bins, keep_files=args.keep, readers=args.readers,
                      live_tomogram=args.live_tomogram)
    print(report.summary())
    if args.json:
        data = asdict(report)
        data["passed"] = report.passed
        Path(args.json).write_text(json.dumps(data, indent=1))
        print(f"report written to {args.json}")
    return 0 if report.passed else 1
