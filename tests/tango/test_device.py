"""XRDCTReducer over Tango without a database: DeviceTestContext(process=True) and a DeviceProxy."""

from __future__ import annotations

import queue
import time

import h5py
import numpy as np
import pytest
import tango
from tango_support import BINS, ROT, TRANS, FastWriter, assert_same, attr_of, configure, props, read_nexus, wait_for

from pipeline.geometry import load_mask
from pipeline.simulate import Player

pytestmark = [pytest.mark.tango, pytest.mark.timeout(180)]

ON, RUNNING, ALARM, FAULT = tango.DevState.ON, tango.DevState.RUNNING, tango.DevState.ALARM, tango.DevState.FAULT


def test_configure_through_attributes_and_reject_invalid(make_device, dirs, sim_scan):
    dev = make_device(props(*dirs))
    assert dev.state() == ON
    assert "no geometry" in dev.status()
    assert dev.landing_directory == str(dirs[0])
    configure(dev, sim_scan)
    assert dev.geometry == sim_scan.poni_text
    assert dev.bins == BINS
    assert dev.mask == str(sim_scan.mask_path)
    assert dev.masked_pixels == int(np.count_nonzero(load_mask(sim_scan.mask_path))) > 0
    assert dev.scan_shape == f"{ROT}x{TRANS}"
    labels = list(dev.get_attribute_config("unit").enum_labels)
    assert labels == ["q_nm^-1", "q_A^-1", "2th_deg"]
    dev.unit = 2
    assert int(dev.unit) == 2
    dev.unit = 0
    cfg = dev.get_attribute_config("throughput")
    assert cfg.unit == "frames/s" and cfg.label == "Throughput" and cfg.format == "%7.1f"
    assert dev.get_attribute_config("bins").max_value == "100000"

    for attr, bad, reason in [("geometry", "Distance: 0.5\nPoni1: x\n", "PONI poni1 is not a number"),
                              ("geometry", "hello: world\n", "unknown PONI key"),
                              ("bins", 0, ""), ("bins", 100001, ""),
                              ("mask", "/no/such/mask.edf", "outside the allowed directories"),
                              ("scan_shape", "12", "NROTxNTRANS")]:
        with pytest.raises(tango.DevFailed) as info:
            dev.write_attribute(attr, bad)
        assert reason in str(info.value), (attr, str(info.value))
    # rejected writes changed nothing
    assert dev.geometry == sim_scan.poni_text and dev.bins == BINS and dev.mask == str(sim_scan.mask_path)

    for name in ("../escape.h5", "/tmp/abs.h5", "sub/../../x.h5"):
        with pytest.raises(tango.DevFailed, match="OutputDirectory"):
            dev.Start(name)
    assert dev.state() == ON
    with pytest.raises(tango.DevFailed, match="not allowed"):
        dev.Stop()


def test_scan_counters_events_and_offline_equality(make_device, dirs, sim_scan, offline):
    landing, output = dirs
    dev = make_device(props(landing, output))
    configure(dev, sim_scan)
    events: dict[str, list] = {"state": [], "throughput": [], "frames_processed": []}
    q: queue.Queue = queue.Queue()
    ids = [dev.subscribe_event(a, tango.EventType.CHANGE_EVENT, q.put) for a in events]
    archive = []
    ids.append(dev.subscribe_event("throughput", tango.EventType.ARCHIVE_EVENT, archive.append))

    t = time.perf_counter()
    path = dev.Start("scan_a")
    assert time.perf_counter() - t < 1.0
    assert path == str(output / "scan_a.h5")
    assert dev.state() == RUNNING
    # configuration is frozen while running
    for attr, value in (("bins", 100), ("geometry", sim_scan.poni_text), ("mask", ""), ("unit", 1)):
        with pytest.raises(tango.DevFailed, match="XRDCT_Busy|while a scan is running"):
            dev.write_attribute(attr, value)
    with pytest.raises(tango.DevFailed, match="not allowed"):
        dev.Start("")
    wait_for(lambda: "preparing" not in dev.status())
    player = Player(sim_scan, landing, rate=8.0)  # 12 frames over 1.5 s: throughput events while running
    player.start()
    wait_for(lambda: dev.state() == ON, timeout=60)
    player.join(5)
    assert dev.frames_processed == ROT * TRANS
    assert dev.frames_expected == ROT * TRANS
    assert dev.frames_missing == 0 and dev.frames_failed == 0 and dev.backlog == 0
    assert dev.latency > 0
    assert dev.output_file == path
    assert dev.engine.startswith("cpu")
    assert dev.bins == BINS  # refused write left it alone
    time.sleep(0.5)  # last publisher cycle
    while not q.empty():
        ev = q.get()
        if not ev.err:
            events[attr_of(ev)].append(ev.attr_value.value)
    for i in ids:
        dev.unsubscribe_event(i)
    assert RUNNING in events["state"] and events["state"][-1] == ON
    assert max(events["throughput"]) > 1.0, events["throughput"]
    assert events["frames_processed"][-1] == ROT * TRANS
    assert any(not e.err and e.attr_value.value > 0 for e in archive)

    # live attributes
    pattern = dev.last_pattern
    radial = dev.radial_axis
    assert pattern.shape == (BINS,) and radial.shape == (BINS,) and np.all(np.diff(radial) > 0)
    nexus = read_nexus(path)
    assert_same(nexus["integrated"], offline["integrated"])
    assert_same(nexus["sinogram"], offline["sinogram"])
    assert_same(pattern, offline["integrated"][-1])
    peak = int(np.nanargmax(np.nanmean(offline["sinogram"], axis=(0, 1))))
    dev.sinogram_bin_start = peak
    dev.sinogram_bin_stop = -1
    assert_same(dev.sinogram, offline["sinogram"][:, :, peak])
    dev.sinogram_bin_stop = peak + 3
    with np.errstate(invalid="ignore"):
        assert_same(dev.sinogram, offline["sinogram"][:, :, peak:peak + 3].mean(axis=2).astype(np.float32))
    # the live tomogram is the filtered back-projection of that sinogram
    from pipeline.tomo import reconstruct

    expected = reconstruct(offline["sinogram"][:, :, peak:peak + 3].mean(axis=2), engine="cpu").images[0]
    np.testing.assert_allclose(dev.tomogram, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert dev.tomogram.shape == (TRANS, TRANS)
    # the file holds the live tomograms of the strongest peaks (property LiveTomogramChannels, default 3),
    # last updated from every rotation
    with h5py.File(path, "r") as f:
        live = f["entry/tomogram_live"]
        assert int(live["rotations_used"][0]) == ROT
        assert live["intensity"].shape == (3, TRANS, TRANS) and np.isfinite(live["intensity"][()]).all()

    # a second scan with the same configuration reuses the pyFAI set-up (Start stays fast)
    assert dev.setup_builds == 1
    with pytest.raises(tango.DevFailed, match="exists already"):
        dev.Start("scan_a.h5")
    t = time.perf_counter()
    dev.Start("scan_b.h5")
    assert time.perf_counter() - t < 1.0
    dev.Stop()
    wait_for(lambda: dev.state() == ON)
    assert dev.setup_builds == 1


def test_stop_and_reads_fast_under_full_load(make_device, dirs, sim_scan):
    landing, output = dirs
    n = 200
    dev = make_device(props(landing, output, BacklogAlarm=4))
    configure(dev, sim_scan, scan="10x20")
    states: list = []
    backlogs: list = []
    sid = dev.subscribe_event("State", tango.EventType.CHANGE_EVENT,
                              lambda ev: states.append(ev.attr_value.value) if not ev.err else None)
    bid = dev.subscribe_event("backlog", tango.EventType.CHANGE_EVENT,
                              lambda ev: backlogs.append(ev.attr_value.value) if not ev.err else None)
    path = dev.Start("")
    assert path.startswith(str(output)) and path.endswith(".h5")
    wait_for(lambda: "preparing" not in dev.status() and "starting" not in dev.status())
    writer = FastWriter(sim_scan, landing, n)
    writer.start()
    wait_for(lambda: dev.frames_processed >= 10, timeout=60, period=0.01)
    # the writer outruns the 2-core pipeline: the backlog grows and the state goes to ALARM
    wait_for(lambda: ALARM in states, timeout=20, period=0.01)
    worst = 0.0
    backlog_max = 0
    for _ in range(10):
        for attr in ("frames_processed", "throughput", "backlog", "last_pattern", "sinogram", "State", "Status"):
            t = time.perf_counter()
            value = dev.read_attribute(attr).value
            worst = max(worst, time.perf_counter() - t)
            if attr == "backlog":
                backlog_max = max(backlog_max, value)
    assert worst < 1.0, f"slowest read {worst:.3f} s"
    print(f"slowest attribute read under load {worst * 1e3:.0f} ms, backlog up to {backlog_max}")
    processed_before = dev.frames_processed
    assert dev.state() in (RUNNING, ALARM)
    t = time.perf_counter()
    dev.Stop()
    stop_time = time.perf_counter() - t
    writer.stop_event.set()
    assert stop_time < 1.0, f"Stop took {stop_time:.2f} s"
    print(f"Stop returned in {stop_time * 1e3:.0f} ms")
    wait_for(lambda: dev.state() == ON, timeout=60)
    writer.join(10)
    processed = dev.frames_processed
    # Stop drains: frames that landed before it are reduced, nothing more arrives afterwards
    assert processed_before <= processed <= writer.written <= n
    assert "Last scan" in dev.status()
    nexus = read_nexus(path)  # closed and readable
    assert np.isfinite(nexus["integrated"][:processed]).all()
    time.sleep(0.4)
    dev.unsubscribe_event(sid)
    dev.unsubscribe_event(bid)
    assert RUNNING in states and states[-1] == ON
    assert max(backlogs) > 4 and backlogs[-1] == 0
    assert states[-1] == ON


def test_fault_and_reset(make_device, tmp_path, sim_scan):
    landing, output = tmp_path / "landing", tmp_path / "output"
    landing.write_text("I am a file, not a directory")
    dev = make_device(props(landing, output))
    configure(dev, sim_scan)
    dev.Start("")
    wait_for(lambda: dev.state() == FAULT)
    status = dev.status()
    assert "not a directory" in status and "To recover" in status and "Reset" in status
    with pytest.raises(tango.DevFailed, match="not allowed"):
        dev.Start("")
    landing.unlink()
    landing.mkdir()
    dev.Reset()
    assert dev.state() == ON
    assert dev.frames_processed == 0 and dev.frames_expected == 0 and dev.output_file == ""
    path = dev.Start("after_reset")
    wait_for(lambda: "preparing" not in dev.status())
    Player(sim_scan, landing, rate=0).run()
    wait_for(lambda: dev.state() == ON, timeout=60)
    assert dev.frames_processed == ROT * TRANS
    assert read_nexus(path)["integrated"].shape == (ROT * TRANS, BINS)


def test_fault_when_output_directory_unusable(make_device, dirs, tmp_path, sim_scan):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output directory should be")
    dev = make_device(props(dirs[0], blocker / "out"))
    configure(dev, sim_scan)
    dev.Start("x.h5")
    wait_for(lambda: dev.state() == FAULT)
    assert "OutputDirectory" in dev.status()
    dev.Reset()
    assert dev.state() == ON


def test_init_in_the_middle_of_a_scan(make_device, dirs, sim_scan):
    landing, output = dirs
    dev = make_device(props(landing, output))
    configure(dev, sim_scan, scan="8x20")
    path = dev.Start("interrupted")
    wait_for(lambda: "preparing" not in dev.status())
    writer = FastWriter(sim_scan, landing, 160)
    writer.start()
    wait_for(lambda: dev.frames_processed >= 5, timeout=60, period=0.01)
    t = time.perf_counter()
    dev.Init()
    init_time = time.perf_counter() - t
    writer.stop_event.set()
    writer.join(10)
    assert init_time < 3.0
    assert dev.state() == ON
    assert dev.frames_processed == 0
    with pytest.raises(tango.DevFailed, match="not allowed"):
        dev.Stop()
    nexus = read_nexus(path)  # the Reducer was aborted and closed the file
    assert 5 <= nexus["integrated"].shape[0] <= 160
    assert np.isfinite(nexus["integrated"][:5]).all()
    # the device works again after Init (configuration re-applied from the memorized values or rewritten)
    if not dev.geometry:
        configure(dev, sim_scan)
    dev.scan_shape = "1x1"
    assert dev.Start("after_init.h5").endswith("after_init.h5")
    wait_for(lambda: dev.state() == ON, timeout=60)
    assert dev.frames_processed == 1


def test_resume_an_interrupted_scan(make_device, dirs, sim_scan, offline):
    """Stop after half a scan, Resume once the rest has landed: every frame once, equal to offline."""
    import h5py

    landing, output = dirs
    dev = make_device(props(landing, output))
    configure(dev, sim_scan)
    n = ROT * TRANS
    frames = list(sim_scan.scan.frames())
    with pytest.raises(tango.DevFailed, match="nothing to resume"):
        dev.Resume("never_started.h5")
    path = dev.Start("half")
    wait_for(lambda: "preparing" not in dev.status())
    Player(sim_scan, landing, rate=0, frames=frames[: n // 2]).run()
    wait_for(lambda: dev.frames_processed == n // 2, timeout=60)
    dev.Stop()
    wait_for(lambda: dev.state() == ON, timeout=30)
    with pytest.raises(tango.DevFailed, match="exists already"):
        dev.Start("half.h5")  # results are never overwritten

    Player(sim_scan, landing, rate=0, frames=frames[n // 2:]).run()  # the rest lands while idle
    assert dev.Resume("half.h5") == path
    wait_for(lambda: dev.state() == ON and dev.frames_processed == n, timeout=60)
    assert dev.frames_missing == 0 and dev.frames_failed == 0
    assert (output / "half.interrupted-1.h5").is_file()
    with h5py.File(path, "r") as f:
        assert sorted(f["entry/integrated/frame_number"][()].tolist()) == frames
        assert (f["entry/integrated/frame_status"][()] == 1).all()
    nexus = read_nexus(path)
    assert_same(nexus["integrated"], offline["integrated"])
    assert_same(nexus["sinogram"], offline["sinogram"])
