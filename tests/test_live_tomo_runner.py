"""Live tomograms from the Reducer while a simulated detector writes the scan (real files, real NeXus)."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from pipeline.config import ReductionConfig
from pipeline.runner import Reducer
from pipeline.simulate import Player, SimulatedScan
from pipeline.tomo import reconstruct

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sim():
    scan = SimulatedScan(10, 16, seed=5)
    scan.prepare()
    return scan


def test_live_tomogram_grows_during_the_scan_and_ends_complete(sim, tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "scan.h5"
    landing.mkdir()
    config = ReductionConfig(poni_text=sim.poni_text, bins=400, engine="cpu")
    reducer = Reducer(config, landing, out, scan=sim.scan, live=True, missing_timeout=5.0,
                      live_tomogram={"channels": 3, "interval": 0.1, "device": "cpu", "min_rotations": 2})
    player = Player(sim, landing, rate=40.0)
    reducer.start()
    player.start()
    seen: list[tuple[int, int]] = []  # (rotations used, frames reduced) seen by an SWMR reader during the scan
    while player.is_alive():
        time.sleep(0.4)
        if not out.exists():
            continue
        try:
            with h5py.File(out, "r", libver="latest", swmr=True) as f:
                used = int(f["entry/tomogram_live/rotations_used"][0])
                status = f["entry/integrated/frame_status"][()]
        except (OSError, KeyError):  # the file is being created
            continue
        if used:
            seen.append((used, int((status == 1).sum())))
    player.join()
    assert reducer.stop(timeout=60)
    m = reducer.snapshot()
    assert m.state == "done", m.message
    assert m.frames_processed == sim.scan.n_frames
    # the tomogram was there before the scan ended, from part of the rotations
    assert seen, "no live tomogram was written while the scan ran"
    assert min(u for u, _ in seen) < sim.rotations
    assert all(frames < sim.scan.n_frames for _, frames in seen[:1])
    stats = reducer.live_tomo.stats
    assert stats["updates"] >= 2 and stats["failures"] == 0
    with h5py.File(out, "r") as f:
        g = f["entry/tomogram_live"]
        assert int(g["rotations_used"][0]) == sim.rotations
        live = g["intensity"][()]
        ranges = [tuple(r) for r in g["bin_range"][()]]
        center = float(g["center"][0])
        sino = f["entry/sinogram/intensity"][()]
    assert live.shape == (3, sim.translations, sim.translations) and np.isfinite(live).all()
    # the last live update is the offline reconstruction of the finished sinogram
    stack = np.stack([np.nanmean(sino[:, :, a:b], axis=2) for a, b in ranges])
    offline = reconstruct(stack, angular_range=180.0, center=center, engine="cpu").images
    np.testing.assert_allclose(live, offline, rtol=1e-4, atol=1e-4 * float(np.abs(offline).max()))


def test_live_tomogram_off_by_default_and_for_a_single_line(sim, tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    for frame in range(sim.translations):
        (landing / sim.filename(frame)).write_bytes(sim.cbf_bytes(frame))
    config = ReductionConfig(poni_text=sim.poni_text, bins=200, engine="cpu")
    events = []
    reducer = Reducer(config, landing, tmp_path / "line.h5", live=False, live_tomogram={"channels": 2},
                      on_event=lambda kind, text: events.append((kind, text)))
    reducer.start()
    assert reducer.wait(60)
    assert reducer.snapshot().state == "done"
    assert reducer.live_tomo is None
    assert any(kind == "tomogram" and "no live tomogram" in text for kind, text in events)
    with h5py.File(tmp_path / "line.h5", "r") as f:
        assert "tomogram_live" not in f["entry"]
