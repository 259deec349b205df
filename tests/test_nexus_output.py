"""The NeXus file as a viewer sees it: writer unit tests, a live end-to-end reduction, and ``xrdct reduce``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import cli  # imported before any per-test capture: cli._progress binds sys.stderr at import
from pipeline.nexus import STATUS_FAILED, STATUS_MISSING, STATUS_OK, STATUS_PENDING, NexusWriter, radial_name
from pipeline.results import FrameResult
from pipeline.scan import ScanModel

pytestmark = pytest.mark.timeout(120)


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_as_viewer(f: h5py.File):
    """Follow the ``default`` attributes from the root as silx view / NeXpy do.

    Returns (entry, nxdata, signal dataset, radial axis dataset).
    """
    assert text(f.attrs.get("NX_class", "NXroot")) == "NXroot"
    entry = f[text(f.attrs["default"])]
    assert text(entry.attrs["NX_class"]) == "NXentry"
    nxdata = entry[text(entry.attrs["default"])]
    assert text(nxdata.attrs["NX_class"]) == "NXdata"
    signal = nxdata[text(nxdata.attrs["signal"])]
    axes = [text(a) for a in np.atleast_1d(nxdata.attrs["axes"])]
    assert len(axes) == signal.ndim
    assert axes[0] == "."  # the frame dimension has no axis of its own
    radial = nxdata[axes[-1]]
    assert radial.ndim == 1 and radial.shape[0] == signal.shape[-1]
    assert text(radial.attrs["units"])
    assert int(nxdata.attrs[f"{axes[-1]}_indices"]) == signal.ndim - 1
    return entry, nxdata, signal, radial


def check_sinogram(entry, scan: ScanModel, patterns: np.ndarray, frames: np.ndarray, radial_axis: np.ndarray):
    """``entry/sinogram`` is an NXdata whose intensity [rot, trans, bin] holds each frame's pattern at its place."""
    sino = entry["sinogram"]
    assert text(sino.attrs["NX_class"]) == "NXdata"
    signal = sino[text(sino.attrs["signal"])]
    assert signal.shape == (scan.rotations, scan.translations, patterns.shape[1])
    axes = [text(a) for a in np.atleast_1d(sino.attrs["axes"])]
    assert len(axes) == 3
    for i, axis_name in enumerate(axes):
        axis = sino[axis_name]
        assert axis.shape == (signal.shape[i],)
        assert "units" in axis.attrs
        assert int(sino.attrs[f"{axis_name}_indices"]) == i
    np.testing.assert_array_equal(sino[axes[2]][()], radial_axis)
    expected = np.full(signal.shape, np.nan, np.float32)
    for row, frame in enumerate(frames):
        rot, trans = scan.position(int(frame))
        expected[rot, trans] = patterns[row]
    np.testing.assert_array_equal(signal[()], expected)  # NaN where NaN, identical elsewhere
    return sino


# -- the writer alone, with synthetic results -------------------------------------------------------


def fake_result(rng, nbins: int) -> FrameResult:
    return FrameResult(rng.random(nbins, dtype=np.float32) * 100, rng.random(nbins, dtype=np.float32),
                       np.ones(nbins, np.float32))


@pytest.mark.parametrize("unit", ["q_nm^-1", "q_A^-1", "2th_deg"])
def test_writer_layout_followed_by_a_viewer(tmp_path, unit):
    rng = np.random.default_rng(1)
    scan = ScanModel(3, 4, order="snake", first_frame=10)
    nbins = 17
    radial = np.linspace(0.5, 30, nbins)
    config = json.dumps({"bins": nbins, "unit": unit})
    path = tmp_path / "out.h5"
    writer = NexusWriter(path, radial, unit, scan, config, "Distance: 0.1\n", "test-engine", flush_interval=0.0)
    frames = list(scan.frames())
    statuses = {12: STATUS_MISSING, 15: STATUS_FAILED}
    results = {}
    order = list(range(len(frames)))
    rng.shuffle(order)  # rows may reach the writer out of order
    for row in order:
        frame = frames[row]
        status = statuses.get(frame, STATUS_OK)
        results[frame] = fake_result(rng, nbins) if status == STATUS_OK else None
        writer.add(row, frame, results[frame], status, f"/landing/f{frame}.cbf" if status != STATUS_MISSING else "",
                   1000.0 + frame)
    writer.close()
    writer.close()  # harmless twice

    with h5py.File(path, "r") as f:
        entry, nxdata, signal, axis = open_as_viewer(f)
        name, units = radial_name(unit)
        assert axis.name.endswith("/" + name) and text(axis.attrs["units"]) == units
        np.testing.assert_array_equal(axis[()], radial)
        assert signal.shape == (len(frames), nbins) and signal.dtype == np.float32
        intensity = signal[()]
        np.testing.assert_array_equal(nxdata["frame_number"][()], frames)
        status = nxdata["frame_status"][()]
        for row, frame in enumerate(frames):
            assert status[row] == statuses.get(frame, STATUS_OK)
            if results[frame] is None:
                assert np.isnan(intensity[row]).all(), "a missing or failed frame must be NaN, never zeros"
                assert np.isnan(nxdata["sigma"][row]).all()
            else:
                np.testing.assert_array_equal(intensity[row], results[frame].intensity)
                np.testing.assert_array_equal(nxdata["intensity_errors"][row], results[frame].sigma)
        np.testing.assert_array_equal(nxdata["sigma"][()], nxdata["intensity_errors"][()])
        assert text(nxdata["source_file"][0]) == f"/landing/f{frames[0]}.cbf"
        np.testing.assert_array_equal(nxdata["landed_time"][()], 1000.0 + np.array(frames))
        check_sinogram(entry, scan, intensity, nxdata["frame_number"][()], radial)
        measured = entry["sinogram/measured"][()]
        for frame in frames:
            assert measured[scan.position(frame)] == statuses.get(frame, STATUS_OK)
        proc = entry["reduction"]
        assert text(proc.attrs["NX_class"]) == "NXprocess"
        assert json.loads(text(proc["configuration"][()])) == json.loads(config)
        assert text(proc["poni"][()]) == "Distance: 0.1\n"
        versions = {k: text(v[()]) for k, v in proc["versions"].items()}
        import fabio
        import pyFAI

        assert versions["pyFAI"] == pyFAI.version and versions["fabio"] == fabio.version
        assert text(entry["end_time"][()])


def test_writer_records_the_scan_with_explicit_positions(tmp_path):
    positions = {5: (1, 0), 6: (0, 1), 7: (0, 0)}
    scan = ScanModel(2, 2, first_frame=5, positions=positions)
    rng = np.random.default_rng(3)
    writer = NexusWriter(tmp_path / "pos.h5", np.arange(4.0), "q_nm^-1", scan, "{}", "", "x", flush_interval=0.0)
    results = {}
    for row, frame in enumerate(scan.frames()):
        results[frame] = fake_result(rng, 4)
        writer.add(row, frame, results[frame], STATUS_OK, f"{frame}.cbf")
    writer.close()
    with h5py.File(tmp_path / "pos.h5", "r") as f:
        info = json.loads(text(f["entry/reduction/scan"][()]))
        assert {int(fr): (r, t) for fr, r, t in info["positions"]} == positions
        assert (info["rotations"], info["translations"], info["first_frame"]) == (2, 2, 5)
        entry, nxdata, signal, axis = open_as_viewer(f)
        sino = check_sinogram(entry, scan, signal[()], nxdata["frame_number"][()], axis[()])
        assert np.isnan(sino["intensity"][1, 1]).all() and sino["measured"][1, 1] == STATUS_PENDING


def test_writer_rows_not_yet_written_are_nan_and_pending(tmp_path):
    """A gap in the rows (a later frame written first) reads as NaN/pending, never as zeros."""
    scan = ScanModel(1, 4)
    writer = NexusWriter(tmp_path / "gap.h5", np.arange(5.0), "q_nm^-1", scan, "{}", "", "x", flush_interval=0.0)
    rng = np.random.default_rng(0)
    res = fake_result(rng, 5)
    writer.add(2, 2, res, STATUS_OK, "f2.cbf")
    with h5py.File(tmp_path / "gap.h5", "r", swmr=True) as f:
        data = f["entry/integrated"]
        assert data["intensity"].shape == (3, 5)
        assert np.isnan(data["intensity"][:2]).all()
        np.testing.assert_array_equal(data["intensity"][2], res.intensity)
        np.testing.assert_array_equal(data["frame_status"][()], [STATUS_PENDING, STATUS_PENDING, STATUS_OK])
        sino = f["entry/sinogram/intensity"][()]
        assert np.isnan(sino[0, [0, 1, 3]]).all()
    writer.close()


def test_writer_swmr_reader_sees_the_file_grow(tmp_path):
    scan = ScanModel(2, 3)
    path = tmp_path / "grow.h5"
    writer = NexusWriter(path, np.arange(8.0), "q_nm^-1", scan, "{}", "", "x", flush_interval=0.0)
    rng = np.random.default_rng(2)
    with h5py.File(path, "r", swmr=True) as f:
        ds = f["entry/integrated/intensity"]
        sino = f["entry/sinogram/intensity"]
        assert ds.shape == (0, 8)
        written = []
        for frame in range(scan.n_frames):
            res = fake_result(rng, 8)
            written.append(res.intensity)
            writer.add(frame, frame, res, STATUS_OK, f"{frame}.cbf")
            ds.refresh()
            sino.refresh()
            assert ds.shape == (frame + 1, 8)
            np.testing.assert_array_equal(ds[frame], res.intensity)
            np.testing.assert_array_equal(sino[scan.position(frame)], res.intensity)
    writer.close()


# -- a reduction end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim():
    from pipeline.simulate import SimulatedScan

    sim = SimulatedScan(2, 3, seed=11)
    sim.prepare()
    return sim


@pytest.fixture(scope="module")
def config(sim):
    from pipeline.config import ReductionConfig

    return ReductionConfig(poni_text=sim.poni_text, bins=500, engine="cpu")


@pytest.fixture(scope="module")
def setup(config):
    from pipeline.geometry import build_setup

    return build_setup(config)


def reference_pattern(setup, sim, frame: int) -> np.ndarray:
    """The frame integrated independently of the pipeline (sparse matrix, numpy)."""
    from pipeline.results import integrate_image_reference

    return integrate_image_reference(setup, sim.image(frame)).intensity


def test_live_reduction_end_to_end(tmp_path, sim, config, setup):
    from pipeline.runner import Reducer
    from pipeline.simulate import Player

    landing, output = tmp_path / "landing", tmp_path / "out" / "scan.h5"
    landing.mkdir()
    skipped = 2
    events: list[tuple[str, str]] = []
    reducer = Reducer(config, landing, output, scan=sim.scan, live=True, missing_timeout=0.5, setup=setup,
                      on_event=lambda kind, msg: events.append((kind, msg)))
    reducer.start()
    deadline = time.monotonic() + 30
    while reducer.snapshot().state == "starting" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reducer.snapshot().state == "running"
    player = Player(sim, landing, rate=5.0, skip=(skipped,))
    player.start()

    # a viewer opens the file while the reducer is still writing it
    seen_rows = []
    with h5py.File(output, "r", swmr=True) as f:
        entry, nxdata, signal, axis = open_as_viewer(f)
        while reducer.running and time.monotonic() < deadline:
            signal.refresh()
            seen_rows.append(signal.shape[0])
            time.sleep(0.05)
    assert seen_rows and seen_rows[0] < sim.n_frames, "the file was not readable while the reduction ran"
    assert seen_rows == sorted(seen_rows)
    player.join(10)
    assert player.error is None
    assert reducer.wait(30)
    m = reducer.snapshot()
    assert m.state == "done", m.message
    assert (m.frames_processed, m.frames_missing, m.frames_failed) == (sim.n_frames - 1, 1, 0)
    assert any(kind == "missing" and f"frame {skipped}" in msg for kind, msg in events)

    with h5py.File(output, "r", swmr=True) as f:
        entry, nxdata, signal, axis = open_as_viewer(f)
        assert text(axis.attrs["units"]) == "1/nm"
        assert signal.shape == (sim.n_frames, config.bins)
        intensity = signal[()]
        frames = nxdata["frame_number"][()]
        np.testing.assert_array_equal(frames, list(sim.scan.frames()))
        status = nxdata["frame_status"][()]
        for row, frame in enumerate(frames):
            if frame == skipped:
                assert status[row] == STATUS_MISSING
                assert np.isnan(intensity[row]).all(), "a missing frame must be NaN, never zeros"
                assert text(nxdata["source_file"][row]) == ""
            else:
                assert status[row] == STATUS_OK
                assert Path(text(nxdata["source_file"][row])).name == sim.filename(int(frame))
                ref = reference_pattern(setup, sim, int(frame))
                np.testing.assert_allclose(intensity[row], ref, rtol=1e-4, atol=1e-6, equal_nan=True)
        sino = check_sinogram(entry, sim.scan, intensity, frames, axis[()])
        measured = sino["measured"][()]
        for frame in frames:
            assert measured[sim.scan.position(int(frame))] == (STATUS_MISSING if frame == skipped else STATUS_OK)


def test_stop_while_waiting_for_frames(tmp_path, sim, config, setup):
    """A Stop finishes the frames that landed and closes a valid file; later frames stay NaN/pending."""
    from pipeline.runner import Reducer
    from pipeline.simulate import write_frame

    landing = tmp_path / "landing"
    landing.mkdir()
    for frame in (0, 1):
        write_frame(landing / sim.filename(frame), sim.cbf_bytes(frame))
    reducer = Reducer(config, landing, tmp_path / "stop.h5", scan=sim.scan, live=True, missing_timeout=30,
                      setup=setup)
    reducer.start()
    deadline = time.monotonic() + 30
    while reducer.snapshot().frames_processed < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reducer.stop(30)
    m = reducer.snapshot()
    assert m.state == "done" and m.frames_processed == 2
    with h5py.File(tmp_path / "stop.h5", "r") as f:
        entry, nxdata, signal, axis = open_as_viewer(f)
        assert signal.shape[0] == 2
        assert np.isfinite(signal[()]).any(axis=1).all()
        sino = entry["sinogram/intensity"][()]
        measured = entry["sinogram/measured"][()]
        for frame in sim.scan.frames():
            cell = sim.scan.position(frame)
            assert measured[cell] == (STATUS_OK if frame < 2 else STATUS_PENDING)
            assert np.isnan(sino[cell]).all() == (frame >= 2)


# -- the command line --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_dir(sim, tmp_path_factory):
    """A finished scan on disk with the last frame never written, plus geometry beside it."""
    from pipeline.simulate import write_frame

    root = tmp_path_factory.mktemp("cli")
    landing = root / "landing"
    landing.mkdir()
    files = sim.write_support_files(root)
    for frame in list(sim.scan.frames())[:-1]:
        write_frame(landing / sim.filename(frame), sim.cbf_bytes(frame))
    (landing / "README.txt").write_text("not a frame")
    return root, landing, files


def check_cli_contract(path: Path, nbins: int, nframes: int, unit_units: str = "1/nm"):
    with h5py.File(path, "r") as f:
        entry, nxdata, signal, axis = open_as_viewer(f)
        assert text(nxdata.attrs["signal"]) == "intensity"
        assert signal.shape == (nframes, nbins)
        assert text(axis.attrs["units"]) == unit_units
        assert "sinogram" in entry and text(entry["sinogram"].attrs["NX_class"]) == "NXdata"
        return signal[()], nxdata["frame_number"][()], nxdata["frame_status"][()], axis[()]


def test_cli_reduce_directory_with_scan(scan_dir, sim, tmp_path, capsys):
    main = cli.main

    root, landing, files = scan_dir
    out = tmp_path / "cli.h5"
    code = main(["reduce", str(landing), "-o", str(out), "--poni", str(files["poni"]), "--mask", str(files["mask"]),
                 "--bins", "300", "--engine", "cpu", "--scan", f"{sim.rotations}x{sim.translations}",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["frames"] == sim.n_frames - 1 and summary["missing"] == 1 and summary["failed"] == 0
    intensity, frames, status, radial = check_cli_contract(out, 300, sim.n_frames)
    last = sim.scan.last_frame
    np.testing.assert_array_equal(frames, list(sim.scan.frames()))
    # offline, the directory is all there is: the frame never written is recorded missing
    assert status[-1] == STATUS_MISSING and np.isnan(intensity[-1]).all()
    assert (status[:-1] == STATUS_OK).all()
    with h5py.File(out, "r") as f:
        check_sinogram(f["entry"], sim.scan, intensity, frames, radial)
        assert f["entry/sinogram/measured"][sim.scan.position(last)] == STATUS_MISSING


def test_cli_reduce_glob_two_theta(scan_dir, sim, tmp_path, capsys):
    main = cli.main

    root, landing, files = scan_dir
    out = tmp_path / "glob.h5"
    code = main(["reduce", str(landing / "frame_*.cbf"), "-o", str(out), "--poni", str(files["poni"]),
                 "--bins", "200", "--unit", "2th_deg", "--engine", "cpu"])
    assert code == 0, capsys.readouterr().err
    n = sim.n_frames - 1  # no scan: one line of the frames found
    intensity, frames, status, radial = check_cli_contract(out, 200, n, "degree")
    np.testing.assert_array_equal(frames, list(sim.scan.frames())[:-1])
    assert (status == STATUS_OK).all()
    with h5py.File(out, "r") as f:
        sino = f["entry/sinogram/intensity"][()]
        assert sino.shape == (1, n, 200)
        np.testing.assert_array_equal(sino[0], intensity)
        assert "two_theta" in f["entry/integrated"]


def test_cli_reduce_command_in_a_subprocess(scan_dir, tmp_path):
    """The installed console entry point, as other tools call it."""
    import subprocess
    import sys

    root, landing, files = scan_dir
    out = tmp_path / "sub.h5"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "reduce", str(landing), "-o", str(out),
                           "--poni", str(files["poni"]), "--bins", "100", "--engine", "cpu"],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "frames reduced" in proc.stdout
    check_cli_contract(out, 100, 5)


def test_cli_reduce_empty_directory_fails_cleanly(tmp_path, scan_dir, capsys):
    main = cli.main

    root, landing, files = scan_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["reduce", str(empty), "-o", str(tmp_path / "x.h5"), "--poni", str(files["poni"]), "--bins", "50",
                 "--engine", "cpu"])
    assert code != 0
    assert "no frame" in capsys.readouterr().err


def test_cli_progress_follows_the_current_stderr(monkeypatch):
    import io

    from pipeline.runner import Metrics

    class FakeReducer:
        calls = 0

        @property
        def running(self):
            self.calls += 1
            return self.calls == 1

        def snapshot(self):
            return Metrics(state="running", frames_expected=6, frames_processed=3)

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr("time.sleep", lambda s: None)
    cli._progress(FakeReducer())
    assert "3/6 frames" in stream.getvalue()


def test_reducer_offline_with_garbage_frame(tmp_path, sim, config, setup):
    """A file with a frame's name that is not a CBF: recorded failed (status 3, NaN), the rest reduced."""
    from pipeline.runner import Reducer
    from pipeline.simulate import write_frame

    landing = tmp_path / "landing"
    landing.mkdir()
    for frame in sim.scan.frames():
        write_frame(landing / sim.filename(frame), sim.cbf_bytes(frame))
    (landing / sim.filename(1)).write_bytes(b"garbage, not a CBF" * 10)
    reducer = Reducer(config, landing, tmp_path / "g.h5", scan=sim.scan, live=False, setup=setup)
    reducer.start()
    assert reducer.wait(60)
    m = reducer.snapshot()
    assert m.state == "done" and (m.frames_processed, m.frames_failed, m.frames_missing) == (sim.n_frames - 1, 1, 0)
    with h5py.File(tmp_path / "g.h5", "r") as f:
        entry, nxdata, signal, axis = open_as_viewer(f)
        status = nxdata["frame_status"][()]
        assert status[1] == STATUS_FAILED and np.isnan(signal[1]).all()
        assert (np.delete(status, 1) == STATUS_OK).all()
        check_sinogram(entry, sim.scan, signal[()], nxdata["frame_number"][()], axis[()])


def test_reducer_threads_end(tmp_path, sim, config, setup):
    """After a reduction no pipeline thread is left behind."""
    from pipeline.runner import Reducer
    from pipeline.simulate import write_frame

    landing = tmp_path / "landing"
    landing.mkdir()
    for frame in (0, 1):
        write_frame(landing / sim.filename(frame), sim.cbf_bytes(frame))
    reducer = Reducer(config, landing, tmp_path / "t.h5", live=False, setup=setup)
    reducer.start()
    assert reducer.wait(60)
    assert reducer.snapshot().state == "done"
    time.sleep(0.1)
    left = [t.name for t in threading.enumerate() if t.name.startswith("xrdct-") and t.is_alive()]
    assert left == []
