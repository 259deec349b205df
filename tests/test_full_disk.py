"""The output disk fills up: a clear error, nothing claimed that is not on disk, and a resume completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from _support import write_cbf

PONI = ("Distance: 0.1\nPoni1: 0.0021\nPoni2: 0.0033\nRot1: 0.01\nRot2: 0.02\nRot3: 0\n"
        "PixelSize1: 0.0001\nPixelSize2: 0.0001\nWavelength: 1e-10\n")
N = 40


@pytest.fixture
def small_disk(small_disk_of):
    """A 4 MiB tmpfs."""
    return small_disk_of("4m")


def reduce(landing, out, poni, *extra):
    cmd = [sys.executable, "-m", "pipeline.cli", "reduce", str(landing), "-o", str(out), "--poni", str(poni),
           "--bins", "300", "--scan", "4x10", "--engine", "cpu", "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_full_disk_faults_clearly_and_resume_completes(tmp_path, small_disk):
    landing = tmp_path / "landing"
    landing.mkdir()
    for i in range(N):
        write_cbf(landing / f"f_{i:05d}.cbf", np.random.default_rng(i).poisson(40, (48, 64)).astype(np.int32))
    poni = tmp_path / "g.poni"
    poni.write_text(PONI)
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 400 * 1024))  # leave 400 KiB: the file starts, then the disk is full
    out = small_disk / "scan.h5"

    first = reduce(landing, out, poni)
    assert first.returncode == 2, first.stderr
    assert "output disk is full" in first.stderr and "resume" in first.stderr
    with h5py.File(out, "r", swmr=True) as f:  # whatever the file says is reduced, it holds
        status = f["entry/integrated/frame_status"][()]
        intensity = f["entry/integrated/intensity"][()]
    ok = status == 1
    assert ok.sum() < N
    assert np.isfinite(intensity[ok]).all()

    filler.unlink()  # the operator frees space
    second = reduce(landing, out, poni, "--resume")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["frames"] == N and summary["failed"] == 0 and summary["missing"] == 0
    fresh = reduce(landing, tmp_path / "fresh.h5", poni)
    assert fresh.returncode == 0, fresh.stderr
    with h5py.File(out, "r") as f, h5py.File(tmp_path / "fresh.h5", "r") as g:
        assert sorted(f["entry/integrated/frame_number"][()].tolist()) == list(range(N))
        assert (f["entry/integrated/frame_status"][()] == 1).all()
        np.testing.assert_allclose(f["entry/integrated/intensity"][()], g["entry/integrated/intensity"][()],
                                   rtol=1e-6)


WRITE_FAILURE_SCRIPT = r"""
import json, sys, threading, time
import numpy as np
from pipeline.config import ReductionConfig
from pipeline.runner import Reducer
from pipeline.scan import ScanModel
landing, out, poni = sys.argv[1:4]
reducer = Reducer(ReductionConfig(poni_text=open(poni).read(), bins=2000, engine="cpu"), landing, out,
                  scan=ScanModel(6, 100), live=False, readers=2)
t0 = time.monotonic()
reducer.start()
done = reducer.wait(60)
elapsed = time.monotonic() - t0
deadline = time.monotonic() + 10
alive = lambda: [t.name for t in threading.enumerate() if t.name.startswith("xrdct-") and t.is_alive()]
while time.monotonic() < deadline and alive():
    time.sleep(0.1)
m = reducer.snapshot()
print(json.dumps({"done": done, "state": m.state, "message": m.message, "elapsed": elapsed, "left": alive()}))
from pipeline.nexus import leave_without_hdf5_cleanup
sys.stdout.flush()
leave_without_hdf5_cleanup(0)
"""


def test_write_failure_faults_at_once_and_every_stage_ends(tmp_path, small_disk):
    """When the writer fails nobody takes results any more; the stages must still end (no thread left
    blocked on a full queue holding staging memory) and the fault must come at once.  In a child process:
    the failed file stays open there until it exits."""
    landing = tmp_path / "landing"
    landing.mkdir()
    rng = np.random.default_rng(4)
    blob = write_cbf(tmp_path / "t.cbf", rng.poisson(20, (200, 300)).astype(np.int32)).read_bytes()
    for i in range(600):
        (landing / f"f_{i:05d}.cbf").write_bytes(blob)
    poni = tmp_path / "g.poni"
    poni.write_text(PONI)
    done = subprocess.run([sys.executable, "-c", WRITE_FAILURE_SCRIPT, str(landing), str(small_disk / "out.h5"),
                           str(poni)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["done"] and report["state"] == "fault" and "disk is full" in report["message"]
    assert report["elapsed"] < 20, f"the fault took {report['elapsed']:.1f} s"
    assert not report["left"], f"pipeline threads still alive after the fault: {report['left']}"
