"""Live tomograms (pipeline.live_tomo): updates while a sinogram fills, agreement with the offline
reconstruction, the SWMR datasets seen by a reader process, failures survived, OpenCL = CPU.

The scan is the simulated phantom (three phases, pipeline.simulate) whose Radon transform weights three
peak profiles, with the rotation axis 1.7 steps off the middle of the translations so that the centre
estimate is seen to work.  Small (48 rotations x 41 translations) to stay fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
from scipy.ndimage import shift as nd_shift

from pipeline import tomo
from pipeline.live_tomo import EVENT_ERROR, EVENT_INFO, LiveTomography, create_live_datasets, write_live
from pipeline.simulate import phantom, radon

N_ROT, N_TRANS = 48, 41
SHIFT = 1.7
TRUE_CENTER = (N_TRANS - 1) / 2 + SHIFT
ANGLES = tomo.default_angles(N_ROT)
Q = np.linspace(10, 50, 160)
PEAKS = (20.1, 26.9, 35.7)  # one peak a phase


@pytest.fixture(scope="module")
def cube() -> np.ndarray:
    """[rotation, translation, bin] float32: the patterns of a complete scan."""
    amounts = np.stack([radon(m, ANGLES) for m in phantom(N_TRANS)])  # [phase, rotation, translation]
    amounts = nd_shift(amounts, (0, 0, SHIFT), order=1)
    profiles = np.stack([np.exp(-0.5 * ((Q - c) / 0.3) ** 2) for c in PEAKS])
    return (np.einsum("prt,pb->rtb", amounts, profiles) + 0.5).astype(np.float32)


def peak_ranges() -> list[tuple[int, int]]:
    return tomo.radial_to_bins(Q, [(c - 0.4, c + 0.4) for c in PEAKS])


def partial(cube: np.ndarray, rotations: int) -> tuple[np.ndarray, np.ndarray]:
    """The cube and flags of a scan whose first ``rotations`` rotations are done (one frame of them missing)."""
    part = np.full_like(cube, np.nan)
    part[:rotations] = cube[:rotations]
    measured = np.zeros((N_ROT, N_TRANS), np.uint8)
    measured[:rotations] = 1
    part[rotations // 2, 7] = np.nan  # a missing frame: flagged, NaN, interpolated by reconstruct
    measured[rotations // 2, 7] = 2
    if rotations < N_ROT:  # the rotation being measured: half done, not used
        part[rotations, :N_TRANS // 2] = cube[rotations, :N_TRANS // 2]
        measured[rotations, :N_TRANS // 2] = 1
    return part, measured


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# -- live updates from the pipeline's own writer ------------------------------------------------------------


def test_updates_while_the_writer_fills_then_agree_with_offline(tmp_path, cube):
    """Frames go through NexusWriter.add rotation by rotation; the live thread reads the writer's own arrays
    (views, no lock) and reconstructs as rotations complete.  The last update equals the offline FBP."""
    from pipeline.nexus import STATUS_OK, NexusWriter
    from pipeline.results import FrameResult
    from pipeline.scan import ScanModel

    scan = ScanModel(N_ROT, N_TRANS)
    writer = NexusWriter(tmp_path / "live.h5", Q, "q_nm^-1", scan, json.dumps({}), "", "cpu")
    updates: list[tuple[int, int, float, bool]] = []
    events: list[tuple[str, str]] = []
    live = LiveTomography(Q, N_ROT, N_TRANS, channels=3, device="cpu", interval=0.02, min_rotations=4,
                          radial_name="q", radial_units="1/nm", on_event=lambda k, t: events.append((k, t)),
                          on_update=lambda t: updates.append((t.update,
                                                              t.reconstruction.n_used, t.reconstruction.center,
                                                              t.center_estimated)))
    assert live.n_channels == 3 and live.size == N_TRANS and live.latest is None
    live.start(lambda: (writer.sinogram, writer.measured))
    try:
        ones = np.ones(Q.size, np.float32)
        for frame in scan.frames():
            rot, trans = scan.position(frame)
            writer.add(frame, frame, FrameResult(cube[rot, trans], None, ones), STATUS_OK)
            if trans == N_TRANS - 1 and rot >= 4 and rot % 6 == 5 and rot < N_ROT - 1:
                # every 6 rotations: the thread catches up on its own before the scan goes on
                seen = live.version
                assert wait_for(lambda s=seen: live.version > s), f"no live update after rotation {rot}"
        during = list(updates)
        final = live.update_now()
        time.sleep(0.15)  # several intervals with nothing new: no more updates
        stats = live.stats
    finally:
        assert live.stop(5.0)
        writer.close()
    assert not live.running
    # updates happened while the scan filled, each from more rotations, none of an incomplete one
    assert len(during) >= 6
    used = [u[1] for u in during]
    assert used == sorted(used) and used[0] >= 4
    for _, n_used, center, estimated in during:
        if estimated:  # estimated once half the rotations were in, then kept
            assert n_used >= N_ROT // 2 - 1 and center == during[-1][2]
        else:
            assert center == (N_TRANS - 1) / 2
    assert during[-1][3] and abs(during[-1][2] - TRUE_CENTER) < 0.15
    assert any(k == EVENT_INFO and "rotation axis" in t for k, t in events)
    assert not [t for k, t in events if k == EVENT_ERROR]
    # channels picked from the mean pattern: one per peak
    centres = sorted(float(Q[(a + b - 1) // 2]) for a, b in live.bin_ranges)
    np.testing.assert_allclose(centres, PEAKS, atol=0.3)
    # the final update: every rotation, the same numbers as the offline reconstruction
    assert final is not None and final.reconstruction.n_used == N_ROT
    assert stats["updates"] == len(updates) and stats["rotations_used"] == N_ROT and stats["failures"] == 0
    assert stats["skipped"] >= 1 and stats["backprojector"].startswith("cpu") and stats["seconds_per_channel"] > 0
    offline = tomo.reconstruct(tomo.channel_sinograms(cube, final.bin_ranges), ANGLES, engine="cpu",
                               center=final.center)
    scale = float(np.abs(offline.images).max())
    np.testing.assert_allclose(final.images, offline.images, rtol=0, atol=1e-6 * scale)
    auto = tomo.reconstruct(tomo.channel_sinograms(cube, final.bin_ranges), ANGLES, engine="cpu", center="auto")
    print(f"live centre {final.center:.3f} (from half the scan), offline {auto.center:.3f}, true {TRUE_CENTER}")
    assert abs(auto.center - final.center) < 0.15
    for c in range(3):
        assert np.corrcoef(final.images[c].ravel(), auto.images[c].ravel())[0, 1] > 0.995


def test_partial_update_uses_complete_rotations_only(cube):
    live = LiveTomography(Q, N_ROT, N_TRANS, channels=peak_ranges(), center=TRUE_CENTER, device="cpu")
    part, measured = partial(cube, 10)
    rec = live.update_now(lambda: (part, measured)).reconstruction
    assert rec.n_used == 10 and rec.rows_used[:10].all() and rec.center == TRUE_CENTER
    offline = tomo.reconstruct(tomo.channel_sinograms(part, peak_ranges())[:, :10], ANGLES[:10],
                               engine="cpu", center=TRUE_CENTER)  # the same rotations, on their own
    np.testing.assert_allclose(rec.images, offline.images, rtol=0, atol=1e-5 * float(np.abs(offline.images).max()))
    assert live.update_now(lambda: (part, measured)) is live.latest and live.version == 1  # nothing new
    assert live.update_now(lambda: (part, measured), force=True) is not None and live.version == 2
    too_few = LiveTomography(Q, N_ROT, N_TRANS, channels=2, min_rotations=12, device="cpu")
    assert too_few.update_now(lambda: (part, measured)) is None and too_few.stats["skipped"] == 1


# -- the NeXus datasets, read by another process in SWMR mode ------------------------------------------------

READER = textwrap.dedent("""
    import json, sys, time
    import h5py, numpy as np
    with h5py.File(sys.argv[1], "r", libver="latest", swmr=True) as f:
        g = f["entry/tomogram_live"]
        def state():
            for ds in g.values():
                ds.refresh()
            img = g["intensity"][()]
            return dict(signal=g.attrs["signal"], axes=list(g.attrs["axes"]), shape=list(img.shape),
                        finite=[bool(np.isfinite(c).all()) for c in img], nan=[bool(np.isnan(c).all()) for c in img],
                        sums=[float(np.nansum(c)) for c in img], rotations_used=int(g["rotations_used"][0]),
                        center=float(g["reconstruction_center"][0]), update=int(g["update_count"][0]),
                        time=float(g["updated_time"][0]), bin_range=g["bin_range"][()].tolist(),
                        q_range=g["q_range"][()].tolist(), radial_start=g["radial_start"][()].tolist(),
                        labels=[v.decode() for v in g["channel_label"][()]],
                        rotation_used=int(g["rotation_used"][()].sum()), x=g["x"][()].tolist(),
                        engine=g["reconstruction_engine"][0].decode())
        print(json.dumps(state()), flush=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            s = state()
            if s["update"] >= 2 and np.isfinite(s["time"]):
                break
            time.sleep(0.02)
        print(json.dumps(s), flush=True)
""")


def test_swmr_reader_sees_live_tomograms(tmp_path, cube):
    path = tmp_path / "swmr.h5"
    ranges = peak_ranges()
    live = LiveTomography(Q, N_ROT, N_TRANS, channels=ranges, center=TRUE_CENTER, device="cpu",
                          radial_name="q", radial_units="1/nm")
    with h5py.File(path, "w", libver="latest") as f:
        entry = f.create_group("entry")
        handle = create_live_datasets(entry, 4, live.size, "q", "1/nm", angles=ANGLES)  # one channel more
        f.swmr_mode = True
        with pytest.raises(RuntimeError, match="before"):
            create_live_datasets(entry, 1, 8, "q", "1/nm", name="too_late")
        part, measured = partial(cube, N_ROT // 2)
        first = live.update_now(lambda: (part, measured))
        write_live(handle, first)
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            seen = json.loads(reader.stdout.readline() or "null")
            assert seen is not None, reader.stderr.read()
            full, flags = partial(cube, N_ROT)
            last = live.update_now(lambda: (full, flags))
            write_live(handle, last)
            final = json.loads(reader.stdout.readline() or "null")
            assert final is not None, reader.stderr.read()
        finally:
            reader.wait(timeout=30)
    assert reader.returncode == 0
    # what the reader saw while the writer held the file open
    assert seen["signal"] == "intensity" and seen["axes"] == ["channel", "y", "x"]
    assert seen["shape"] == [4, N_TRANS, N_TRANS]
    assert seen["finite"] == [True, True, True, False] and seen["nan"][3]
    assert seen["rotations_used"] == N_ROT // 2 == seen["rotation_used"] and seen["update"] == 1
    assert seen["center"] == pytest.approx(TRUE_CENTER) and seen["engine"] == "cpu"
    np.testing.assert_allclose(seen["sums"][:3], first.images.sum(axis=(1, 2)), rtol=1e-5)
    assert seen["bin_range"] == [list(r) for r in ranges] + [[-1, -1]]
    np.testing.assert_allclose(seen["q_range"][:3], first.radial_ranges())
    assert np.isnan(seen["q_range"][3]).all() and seen["radial_start"][0] == seen["q_range"][0][0]
    assert seen["labels"][0].startswith("q ") and seen["labels"][3] == ""
    np.testing.assert_allclose(seen["x"], np.arange(N_TRANS) - (N_TRANS - 1) / 2)  # as write_tomograms
    # ... and the next update, without reopening
    assert final["update"] == 2 and final["rotations_used"] == N_ROT and final["time"] >= seen["time"]
    np.testing.assert_allclose(final["sums"][:3], last.images.sum(axis=(1, 2)), rtol=1e-5)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["entry/tomogram_live/intensity"][:3], last.images)


# -- failures -------------------------------------------------------------------------------------------------


def test_failures_are_reported_and_the_thread_survives(cube):
    part, measured = partial(cube, 12)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] <= 3:
            raise OSError("detector file system gone")
        return part, measured

    events: list[tuple[str, str]] = []
    live = LiveTomography(Q, N_ROT, N_TRANS, channels=peak_ranges(), device="cpu", interval=0.01,
                          on_event=lambda k, t: events.append((k, t)))
    live.start(flaky)
    try:
        assert wait_for(lambda: live.version >= 1), live.stats
        assert live.running
        stats = live.stats
        assert stats["failures"] == 3 and "detector file system gone" in stats["last_error"]
        errors = [t for k, t in events if k == EVENT_ERROR]
        assert len(errors) == 1 and "snapshot" in errors[0]  # the same failure is reported once, counted 3 times
        # a snapshot of the wrong shape: counted, reported, nothing raised, the last tomogram kept
        good = live.latest
        assert live.update_now(lambda: (part[:, :, :10], measured)) is good
        assert live.stats["failures"] == 4 and "shape" in live.stats["last_error"] and live.running
    finally:
        assert live.stop(5.0)
    # callbacks that raise break nothing; without any snapshot, update_now reports instead of raising

    def bad_callback(*args):
        raise RuntimeError("client bug")

    live = LiveTomography(Q, N_ROT, N_TRANS, channels=peak_ranges(), device="cpu", on_event=bad_callback,
                          on_update=bad_callback)
    assert live.update_now() is None and live.stats["failures"] == 1
    assert live.update_now(lambda: (part, measured)) is not None and live.stats["failures"] == 2
    assert live.version == 1


def test_unknown_device_falls_back_to_the_cpu(cube):
    events: list[tuple[str, str]] = []
    live = LiveTomography(Q, N_ROT, N_TRANS, channels=peak_ranges(), device="no-such-device",
                          on_event=lambda k, t: events.append((k, t)))
    part, measured = partial(cube, 8)
    assert live.update_now(lambda: (part, measured)).reconstruction.engine == "cpu"
    assert live.stats["backprojector"].startswith("cpu")
    assert any(k == EVENT_ERROR and "no-such-device" in t for k, t in events)
    with pytest.raises(ValueError):
        LiveTomography(Q, N_ROT, N_TRANS, channels=[(150, 170)])  # beyond the 160 bins: refused up front


# -- OpenCL ---------------------------------------------------------------------------------------------------


@pytest.mark.opencl
def test_opencl_backprojector_equals_cpu(cube):
    if tomo.opencl_backprojector() is None:
        pytest.skip("no OpenCL device")
    part, measured = partial(cube, 30)  # past half: the centre is estimated, the same way on both
    results = {}
    for device in ("cpu", "opencl"):
        live = LiveTomography(Q, N_ROT, N_TRANS, channels=peak_ranges(), device=device, filter_name="hann")
        results[device] = (live.update_now(lambda: (part, measured)), live.stats)
    cpu, gpu = results["cpu"][0], results["opencl"][0]
    assert results["opencl"][1]["backprojector"].startswith("opencl") and gpu.reconstruction.engine.startswith("opencl")
    assert cpu.center == gpu.center and abs(cpu.center - TRUE_CENTER) < 0.2
    scale = float(np.abs(cpu.images).max())
    err = float(np.abs(gpu.images - cpu.images).max()) / scale
    per_channel = {k: f"{v[1]['seconds_per_channel'] * 1e3:.2f} ms" for k, v in results.items()}
    print(f"live OpenCL ({gpu.reconstruction.engine}) vs CPU: max|diff|/max = {err:.2e}; per channel {per_channel}")
    np.testing.assert_allclose(gpu.images, cpu.images, rtol=0, atol=2e-5 * scale)


def test_thread_is_a_daemon_and_stops_promptly(cube):
    part, measured = partial(cube, 6)
    live = LiveTomography(Q, N_ROT, N_TRANS, channels=peak_ranges(), device="cpu", interval=30.0)
    live.start(lambda: (part, measured))
    thread = next(t for t in threading.enumerate() if t.name == "xrdct-live-tomo")
    assert thread.daemon
    t0 = time.monotonic()
    assert live.stop(5.0) and time.monotonic() - t0 < 1.0  # not held by the 30 s interval
    assert live.version == 0  # nothing happened before the first interval
