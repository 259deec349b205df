"""A reduction killed in the middle of a scan resumes: no frame lost, none reduced twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from _support import write_cbf

SHAPE = (48, 64)
N_FRAMES = 24
PONI = ("Distance: 0.1\nPoni1: 0.0021\nPoni2: 0.0033\nRot1: 0.01\nRot2: 0.02\nRot3: 0\n"
        "PixelSize1: 0.0001\nPixelSize2: 0.0001\nWavelength: 1e-10\n")


def frame_data(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    data = rng.poisson(40 + i, SHAPE).astype(np.int32)
    data[:, 30:32] = -1  # a gap
    return data


def reduce_cmd(landing, out, *extra):
    return [sys.executable, "-m", "pipeline.cli", "reduce", str(landing), "-o", str(out), "--poni",
            str(landing.parent / "g.poni"), "--bins", "40", "--scan", f"2x{N_FRAMES // 2}", "--engine", "cpu",
            "--timeout", "30", *extra]


def reduced_frames(path) -> int:
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return int((f["entry/integrated/frame_status"][()] == 1).sum())
    except (OSError, KeyError):
        return 0


@pytest.fixture
def scan_dirs(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (tmp_path / "g.poni").write_text(PONI)
    return landing, tmp_path


def test_killed_reduction_resumes_exactly_once(scan_dirs):
    landing, tmp = scan_dirs
    out = tmp / "scan.h5"
    stop_writer = threading.Event()

    def detector():  # frames land slowly while the reduction runs
        for i in range(1, N_FRAMES):
            if stop_writer.is_set():
                return
            write_cbf(landing / f"f_{i:05d}.cbf", frame_data(i))
            time.sleep(0.25)

    writer = threading.Thread(target=detector)
    write_cbf(landing / "f_00000.cbf", frame_data(0))  # the first frame tells the reducer the frame shape
    proc = subprocess.Popen(reduce_cmd(landing, out, "--live"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not out.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the reduction never started"
            time.sleep(0.05)
        writer.start()
        while reduced_frames(out) < 5:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the reduction never got going"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up at all: as a crash or a power cut
        proc.wait(10)
    finally:
        if writer.is_alive() or writer.ident:
            writer.join()
        if proc.poll() is None:
            proc.kill()
    before = reduced_frames(out)
    assert 5 <= before < N_FRAMES

    done = subprocess.run(reduce_cmd(landing, out, "--resume", "--json"), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary["frames"] == N_FRAMES and summary["missing"] == 0 and summary["failed"] == 0
    assert summary["resumed"] >= before - 1  # rows not yet flushed when killed are simply redone

    aside = tmp / "scan.interrupted-1.h5"
    assert aside.exists(), "the interrupted file is kept, renamed"
    fresh = tmp / "fresh.h5"
    ref = subprocess.run(reduce_cmd(landing, fresh), capture_output=True, timeout=120)
    assert ref.returncode == 0, ref.stderr.decode()
    with h5py.File(out, "r") as f, h5py.File(fresh, "r") as g:
        frames = f["entry/integrated/frame_number"][()]
        assert sorted(frames.tolist()) == list(range(N_FRAMES))  # every frame exactly once
        assert (f["entry/integrated/frame_status"][()] == 1).all()
        np.testing.assert_allclose(f["entry/integrated/intensity"][()], g["entry/integrated/intensity"][()],
                                   rtol=1e-6)
        np.testing.assert_allclose(f["entry/sinogram/intensity"][()], g["entry/sinogram/intensity"][()],
                                   rtol=1e-6)


def test_resume_refuses_other_settings_and_keeps_the_file(scan_dirs):
    landing, tmp = scan_dirs
    for i in range(N_FRAMES):
        write_cbf(landing / f"f_{i:05d}.cbf", frame_data(i))
    out = tmp / "scan.h5"
    first = subprocess.run(reduce_cmd(landing, out), capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr.decode()
    digest = out.read_bytes()
    other = reduce_cmd(landing, out, "--resume")
    other[other.index("--bins") + 1] = "41"
    refused = subprocess.run(other, capture_output=True, timeout=120)
    assert refused.returncode != 0
    assert "other settings (bins)" in refused.stderr.decode()
    assert out.read_bytes() == digest  # untouched
    again = subprocess.run(reduce_cmd(landing, out), capture_output=True, timeout=120)
    assert again.returncode != 0 and "not overwritten" in again.stderr.decode()


def test_reduce_can_add_tomograms(scan_dirs):
    landing, tmp = scan_dirs
    for i in range(N_FRAMES):
        write_cbf(landing / f"f_{i:05d}.cbf", frame_data(i))
    out = tmp / "tomo.h5"
    done = subprocess.run(reduce_cmd(landing, out, "--tomogram", "peaks"), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    with h5py.File(out, "r") as f:
        tomo = f["entry/tomogram"]
        assert tomo.attrs["NX_class"] == "NXdata"
        images = tomo["intensity"][()]
        assert images.ndim == 3 and images.shape[1:] == (N_FRAMES // 2, N_FRAMES // 2)
        assert np.isfinite(images).all()
