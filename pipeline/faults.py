"""Fault injection report: each fault of the reliability list, run several times, counted from the output file.

``xrdct faults`` writes small Pilatus-like frames (the soak's generator, Pilatus 300K size) into a landing
directory while a live :class:`~pipeline.runner.Reducer` reduces them, injects one fault per scenario, and
then reads the NeXus file back: every frame sent intact must be there once with status "reduced"
(otherwise it is *lost*), every bad or absent frame must be recorded as failed or missing (never
silently skipped), and no frame may have two rows (*duplicated*).  The table it prints is the
reliability report of the README; the pytest suite checks the same faults one by one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import ReductionConfig
from .nexus import STATUS_FAILED, STATUS_MISSING, STATUS_OK
from .scan import ScanModel

N_FRAMES = 24
TIMEOUT = 1.0  # seconds before a frame is declared missing


@dataclass
class Outcome:
    sent_intact: set = field(default_factory=set)  # frames written whole and valid: must be reduced
    bad: set = field(default_factory=set)  # frames written bad or not at all: must be flagged failed/missing
    unknown: set = field(default_factory=set)  # fuzzed: either reduced or failed, but never lost


@dataclass
class FaultRow:
    fault: str
    runs: int = 0
    sent: int = 0
    reduced: int = 0
    flagged: int = 0  # recorded as failed or missing
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0  # a bad frame reported as reduced
    skipped: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.skipped and self.lost == 0 and self.duplicated == 0 and self.wrong == 0


class Scenario:
    """A fault: ``produce`` writes the landing directory (in a thread, while the reducer runs)."""

    name = ""
    check_md5 = False
    needs_opencl = False

    def produce(self, landing: Path, blobs: list[bytes], rng: random.Random) -> Outcome:
        raise NotImplementedError

    def run(self, base: Path, blobs: list[bytes], poni: str, rng: random.Random) -> tuple[Outcome, Path]:
        from .runner import Reducer

        landing, out = base / "landing", base / "out.h5"
        landing.mkdir(parents=True)
        config = ReductionConfig(poni_text=poni, bins=300, engine="cpu", check_md5=self.check_md5)
        self.written: list[int] = []  # frames in the order the writer took them (a duplicate shows here)
        reducer = Reducer(config, landing, out, scan=ScanModel(1, N_FRAMES), live=True, missing_timeout=TIMEOUT,
                          poll_interval=0.01, engine=self.engine(config),
                          on_result=lambda frame, result: self.written.append(frame))
        reducer.start()
        result: list = []
        writer = threading.Thread(target=lambda: result.append(self.produce(landing, blobs, rng)), daemon=True)
        writer.start()
        writer.join(60)
        if not reducer.wait(60):
            reducer.abort(10)
        if reducer.snapshot().state != "done":
            raise RuntimeError(f"{self.name}: reduction ended in {reducer.snapshot().message}")
        return result[0], out

    def engine(self, config):
        return None


def write(landing: Path, frame: int, data: bytes, name: str | None = None) -> None:
    from .simulate import write_frame

    write_frame(landing / (name or f"frame_{frame:05d}.cbf"), data)


class Clean(Scenario):
    name = "none (baseline)"

    def produce(self, landing, blobs, rng):
        for i in range(N_FRAMES):
            write(landing, i, blobs[i % len(blobs)])
        return Outcome(sent_intact=set(range(N_FRAMES)))


class OneBad(Scenario):
    """Frames 0..N-1 with a bad version of a few of them."""

    frames = (5, 11)

    def bad_bytes(self, blob: bytes, rng: random.Random) -> bytes | None:
        raise NotImplementedError

    def produce(self, landing, blobs, rng):
        out = Outcome()
        for i in range(N_FRAMES):
            blob = blobs[i % len(blobs)]
            if i in self.frames:
                data = self.bad_bytes(blob, rng)
                if data is not None:
                    write(landing, i, data)
                out.bad.add(i)
            else:
                write(landing, i, blob)
                out.sent_intact.add(i)
        return out


class ZeroBytes(OneBad):
    name = "zero-byte file"

    def bad_bytes(self, blob, rng):
        return b""


class Truncated(OneBad):
    name = "truncated file"

    def bad_bytes(self, blob, rng):
        return blob[: rng.randrange(len(blob) // 4, len(blob) - 1)]


class WrongShape(OneBad):
    name = "wrong dimensions"

    def bad_bytes(self, blob, rng):
        import fabio.cbfimage

        with tempfile.NamedTemporaryFile(suffix=".cbf", delete=False) as tmp:
            name = tmp.name
        fabio.cbfimage.CbfImage(data=np.ones((100, 120), np.int32)).write(name)
        data = Path(name).read_bytes()
        os.unlink(name)
        return data


class BadMd5(OneBad):
    name = "corrupt binary (MD5 check on)"
    check_md5 = True

    def bad_bytes(self, blob, rng):
        data = bytearray(blob)
        data[len(data) - rng.randrange(100, 10000)] ^= 0x40
        return bytes(data)


class NotCbf(OneBad):
    name = "not a CBF (garbage, frame-like name)"

    def bad_bytes(self, blob, rng):
        return bytes(rng.getrandbits(8) for _ in range(5000))


class Missing(OneBad):
    name = "frames that never arrive"
    frames = (6, 7, 15)

    def bad_bytes(self, blob, rng):
        return None


class Growing(Scenario):
    name = "files still being written (NFS-like pieces)"

    def produce(self, landing, blobs, rng):
        from .simulate import write_frame

        for i in range(N_FRAMES):
            write_frame(landing / f"frame_{i:05d}.cbf", blobs[i % len(blobs)], partial=True, pieces=4, delay=0.03)
        return Outcome(sent_intact=set(range(N_FRAMES)))


class Duplicates(Scenario):
    name = "duplicated frame numbers, odd names"

    def produce(self, landing, blobs, rng):
        for i in range(N_FRAMES):
            write(landing, i, blobs[i % len(blobs)])
            if i in (4, 9):  # same frame number under another name, with other content
                write(landing, i, blobs[(i + 1) % len(blobs)], name=f"copy_of_{i:05d}.cbf")
        (landing / "notes.txt").write_text("not a frame")
        (landing / "frame_x.cbf").write_bytes(blobs[0])
        return Outcome(sent_intact=set(range(N_FRAMES)))


class OutOfOrder(Scenario):
    name = "frames far out of order"

    def produce(self, landing, blobs, rng):
        order = list(range(N_FRAMES))
        for start in range(0, N_FRAMES, 8):  # blocks of 8 shuffled: up to 7 frames early or late
            block = order[start:start + 8]
            rng.shuffle(block)
            order[start:start + 8] = block
        for i in order:
            write(landing, i, blobs[i % len(blobs)])
            time.sleep(0.01)
        return Outcome(sent_intact=set(range(N_FRAMES)))


class DirectoryVanishes(Scenario):
    name = "landing directory gone and back (remount)"

    def produce(self, landing, blobs, rng):
        half = N_FRAMES // 2
        for i in range(half):
            write(landing, i, blobs[i % len(blobs)])
        time.sleep(0.3)
        aside = landing.with_name("landing-away")
        landing.rename(aside)
        time.sleep(0.6)
        aside.rename(landing)
        for i in range(half, N_FRAMES):
            write(landing, i, blobs[i % len(blobs)])
        return Outcome(sent_intact=set(range(N_FRAMES)))


class Fuzzed(Scenario):
    name = "fuzzed files (random corruption)"

    def produce(self, landing, blobs, rng):
        out = Outcome()
        for i in range(N_FRAMES):
            data = bytearray(blobs[i % len(blobs)])
            if i % 2:
                for _ in range(rng.randrange(1, 20)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                if rng.random() < 0.3:
                    data = data[: rng.randrange(len(data))]
                out.unknown.add(i)
            else:
                out.sent_intact.add(i)
            write(landing, i, bytes(data))
        return out


class OpenClFailure(Scenario):
    name = "OpenCL failure mid-scan (redone on the CPU)"
    needs_opencl = True

    def engine(self, config):
        from .engines import EngineFailure
        from .geometry import build_setup
        from .opencl.engine import OpenCLEngine, find_device

        class Failing(OpenCLEngine):
            calls = 0

            def integrate_batch(self, frames):
                Failing.calls += 1
                if Failing.calls == 2:
                    raise EngineFailure("injected: device lost")
                return super().integrate_batch(frames)

        return Failing(build_setup(config), find_device(), batch_size=4, slots=2)

    def produce(self, landing, blobs, rng):
        for i in range(N_FRAMES):
            write(landing, i, blobs[i % len(blobs)])
            time.sleep(0.02)
        return Outcome(sent_intact=set(range(N_FRAMES)))


class KilledAndResumed(Scenario):
    name = "SIGKILL mid-scan, then --resume"

    def run(self, base, blobs, poni, rng):
        landing, out = base / "landing", base / "out.h5"
        landing.mkdir(parents=True)
        n = 300
        for i in range(n):
            write(landing, i, blobs[i % len(blobs)])
        (base / "g.poni").write_text(poni)
        cmd = [sys.executable, "-m", "pipeline.cli", "reduce", str(landing), "-o", str(out), "--poni",
               str(base / "g.poni"), "--bins", "300", "--engine", "cpu", "--scan", f"3x{n // 3}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 5.0))  # set-up takes ~2 s; then frames are being written
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=300)
        return Outcome(sent_intact=set(range(n))), out


class FullDisk(Scenario):
    name = "output disk full (ENOSPC), then resume"

    def run(self, base, blobs, poni, rng):
        from .runner import Reducer

        landing, disk = base / "landing", base / "disk"
        landing.mkdir(parents=True)
        disk.mkdir()
        n = 120
        for i in range(n):
            write(landing, i, blobs[i % len(blobs)])
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                          capture_output=True).returncode:
            raise PermissionError("cannot mount a small tmpfs (needs root)")
        try:
            config = ReductionConfig(poni_text=poni, bins=1000, engine="cpu")
            out = disk / "out.h5"
            red = Reducer(config, landing, out, scan=ScanModel(2, n // 2), live=False)
            red.start()
            red.wait(120)
            if red.snapshot().state != "fault":
                raise RuntimeError("the disk did not fill up")
            subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
            red = Reducer(config, landing, out, scan=ScanModel(2, n // 2), live=False, resume=True)
            red.start()
            red.wait(120)
            final = base / "out.h5"
            shutil.copy(out, final)
        finally:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        return Outcome(sent_intact=set(range(n))), final


SCENARIOS: list[Callable[[], Scenario]] = [Clean, ZeroBytes, Truncated, Growing, WrongShape, BadMd5, Duplicates,
                                           NotCbf, Missing, OutOfOrder, DirectoryVanishes, Fuzzed, OpenClFailure,
                                           KilledAndResumed, FullDisk]


def score(row: FaultRow, outcome: Outcome, out: Path, written: list[int] | None = None) -> None:
    """Add one run's counts, read from the NeXus file, to ``row``."""
    import h5py

    with h5py.File(out, "r") as f:
        g = f["entry/integrated"]
        frames = g["frame_number"][()]
        status = g["frame_status"][()]
    rows = frames >= 0
    numbers, counts = np.unique(frames[rows], return_counts=True)
    row.duplicated += int((counts - 1).sum())
    if written is not None:  # one row per frame in the file: a second write would overwrite it, so count writes
        row.duplicated += len(written) - len(set(written))
    by_frame = {int(fr): int(st) for fr, st in zip(frames[rows], status[rows])}
    reduced = {fr for fr, st in by_frame.items() if st == STATUS_OK}
    flagged = {fr for fr, st in by_frame.items() if st in (STATUS_FAILED, STATUS_MISSING)}
    row.sent += len(outcome.sent_intact) + len(outcome.unknown) + len(outcome.bad)
    row.reduced += len(reduced)
    row.flagged += len(flagged)
    row.lost += len(outcome.sent_intact - reduced) + len(outcome.unknown - reduced - flagged) \
        + len(outcome.bad - flagged - reduced)
    row.wrong += len(outcome.bad & reduced)


def run_faults(runs: int = 3, only: list[str] | None = None, log=print) -> list[FaultRow]:
    from .simulate import make_poni_text
    from .soak import DETECTORS, make_frames

    shape, detector = DETECTORS["pilatus300k"]
    poni = make_poni_text(shape, detector)
    blobs = make_frames(poni, 4)
    rows = []
    for make in SCENARIOS:
        scenario = make()
        if only and not any(word in scenario.name for word in only):
            continue
        row = FaultRow(scenario.name)
        t0 = time.time()
        for k in range(runs):
            base = Path(tempfile.mkdtemp(prefix="xrdct-fault-"))
            try:
                if scenario.needs_opencl:
                    from .opencl.engine import find_device

                    if find_device() is None:
                        raise ImportError("no OpenCL device")
                outcome, out = scenario.run(base, blobs, poni, random.Random(1000 * k + 7))
                score(row, outcome, out, getattr(scenario, "written", None))
                row.runs += 1
            except (ImportError, PermissionError) as exc:
                row.skipped = f"skipped: {exc}"
                break
            finally:
                shutil.rmtree(base, ignore_errors=True)
        row.seconds = time.time() - t0
        log(f"  {row.fault:45s} runs {row.runs}  sent {row.sent:4d}  reduced {row.reduced:4d}  flagged "
            f"{row.flagged:3d}  lost {row.lost}  duplicated {row.duplicated}  wrong {row.wrong}  {row.skipped}")
        rows.append(row)
    return rows


def markdown(rows: list[FaultRow]) -> str:
    lines = ["| fault | runs | frames sent | reduced | recorded failed/missing | lost | duplicated | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        verdict = r.skipped or ("pass" if r.passed else "FAIL")
        lines.append(f"| {r.fault} | {r.runs} | {r.sent} | {r.reduced} | {r.flagged} | {r.lost} | {r.duplicated} "
                     f"| {verdict} |")
    return "\n".join(lines)


def main(args) -> int:
    rows = run_faults(args.runs, args.only)
    print()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in rows], indent=1))
    return 0 if all(r.passed or r.skipped for r in rows) else 1
