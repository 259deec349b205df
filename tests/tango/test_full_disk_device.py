"""The device's output disk fills up mid-scan: FAULT with a clear Status, then Reset + Resume in the same
server process completes the scan, every frame once (HDF5 used to crash on the failed file there)."""

from __future__ import annotations

import subprocess

import h5py
import pytest
import tango
from tango_support import ROT, TRANS, configure, props, wait_for

from pipeline.simulate import Player

ON, FAULT = tango.DevState.ON, tango.DevState.FAULT


@pytest.fixture
def small_disk(small_disk_of):
    return small_disk_of("200k")


def test_full_disk_faults_then_reset_and_resume_in_the_same_server(make_device, tmp_path, small_disk, sim_scan):
    landing = tmp_path / "landing"
    landing.mkdir()
    dev = make_device(props(landing, small_disk))
    configure(dev, sim_scan, bins=4000)  # 32 kB of patterns a frame: 12 frames do not fit in 200 kB
    path = dev.Start("scan")
    Player(sim_scan, landing, rate=0).run()
    wait_for(lambda: dev.state() == FAULT, timeout=60)
    status = dev.status()
    assert "disk is full" in status and "resume" in status.lower(), status
    assert dev.state() == FAULT  # the server is alive and answers

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    dev.Reset()
    wait_for(lambda: dev.state() == ON, timeout=30)
    assert dev.Resume("scan.h5") == path
    wait_for(lambda: dev.state() == ON and dev.frames_processed == ROT * TRANS, timeout=60)
    assert dev.frames_failed == 0 and dev.frames_missing == 0
    with h5py.File(path, "r") as f:
        numbers = f["entry/integrated/frame_number"][()].tolist()
        assert sorted(numbers) == list(sim_scan.scan.frames())  # every frame once
        assert (f["entry/integrated/frame_status"][()] == 1).all()
    dev.Init()  # and the server still works afterwards
    assert dev.state() == ON
