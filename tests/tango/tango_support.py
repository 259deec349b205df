"""Fixtures for the XRDCTReducer device tests: one small simulated scan, its offline reduction, a device."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("tango")

ROT, TRANS = 3, 4
BINS = 500
SUPPORT_DIRS: list[str] = []  # where sim_scan put its PONI and mask: an allowed mask directory of the devices


@pytest.fixture(scope="session")
def sim_scan(tmp_path_factory):
    """A 3x4 scan of full Pilatus CdTe 2M frames, generated once, with its PONI and mask files."""
    from pipeline.simulate import SimulatedScan

    sim = SimulatedScan(ROT, TRANS, seed=0)
    sim.prepare()
    files = sim.write_support_files(tmp_path_factory.mktemp("support"))
    sim.poni_path, sim.mask_path = files["poni"], files["mask"]
    # one entry per definition of this fixture (tests/tango and tests/macros each have theirs in a session)
    SUPPORT_DIRS.append(str(files["mask"].parent))
    return sim


@pytest.fixture(scope="session")
def offline(sim_scan, tmp_path_factory):
    """The same frames reduced offline with ``xrdct reduce`` (CPU engine): integrated and sinogram arrays."""
    from pipeline.simulate import Player

    work = tmp_path_factory.mktemp("offline")
    Player(sim_scan, work / "frames", rate=0).run()
    out = work / "offline.h5"
    cmd = [sys.executable, "-m", "pipeline.cli", "reduce", str(work / "frames"), "-o", str(out),
           "--poni", str(sim_scan.poni_path), "--mask", str(sim_scan.mask_path), "--scan", f"{ROT}x{TRANS}",
           "--bins", str(BINS), "--engine", "cpu"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    with h5py.File(out, "r") as f:
        return {"integrated": f["entry/integrated/intensity"][()], "sinogram": f["entry/sinogram/intensity"][()]}


@pytest.fixture
def dirs(tmp_path):
    landing, output = tmp_path / "landing", tmp_path / "output"
    landing.mkdir()
    output.mkdir()
    return landing, output


def props(landing, output, **extra):
    base = {"LandingDirectory": str(landing), "OutputDirectory": str(output), "Engine": "cpu",
            "MissingTimeout": 2.0}
    if SUPPORT_DIRS:  # masks are only read from the MaskDirectories property (default: OutputDirectory)
        base["MaskDirectories"] = list(SUPPORT_DIRS)
    base.update(extra)
    return base


@pytest.fixture
def make_device():
    """DeviceTestContext(XRDCTReducer, process=True) factory; contexts are closed at the end of the test."""
    from tango.test_context import DeviceTestContext

    from tango_ds.device import XRDCTReducer

    contexts = []

    def make(properties, **kwargs):
        ctx = DeviceTestContext(XRDCTReducer, properties=properties, process=True, timeout=30, **kwargs)
        proxy = ctx.__enter__()
        contexts.append(ctx)
        return proxy

    yield make
    for ctx in reversed(contexts):
        try:
            ctx.__exit__(None, None, None)
        except Exception:  # stop() may raise in 10.x; the process is gone either way
            pass


def configure(dev, sim, bins=BINS, scan=f"{ROT}x{TRANS}"):
    dev.geometry = sim.poni_text
    dev.bins = bins
    dev.mask = str(sim.mask_path)
    dev.scan_shape = scan


def wait_for(predicate, timeout=30.0, period=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"condition not met within {timeout} s")


class FastWriter(threading.Thread):
    """Writes ``n`` frames as fast as the disk goes, cycling through the simulated frames' CBF bytes."""

    def __init__(self, sim, landing: Path, n: int):
        super().__init__(daemon=True)
        self.blobs = [sim.cbf_bytes(f) for f in sim.scan.frames()]
        self.landing, self.n = Path(landing), n
        self.stop_event = threading.Event()
        self.written = 0

    def run(self):
        for i in range(self.n):
            if self.stop_event.is_set():
                return
            tmp = self.landing / f".tmp_{i:05d}"
            tmp.write_bytes(self.blobs[i % len(self.blobs)])
            tmp.rename(self.landing / f"frame_{i:05d}.cbf")
            self.written += 1


def read_nexus(path):
    with h5py.File(path, "r") as f:
        return {"integrated": f["entry/integrated/intensity"][()], "sinogram": f["entry/sinogram/intensity"][()]}


def assert_same(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, equal_nan=True)


def attr_of(event) -> str:
    """Attribute name of an event (``tango://h:p/a/b/c/name#dbase=no`` -> ``name``)."""
    return event.attr_name.split("#", 1)[0].rsplit("/", 1)[-1].lower()
