"""What a Tango client may make the XRDCTReducer device do, tried on a real device over Tango: names that
would leave the mask or output directories, bad values for every writable attribute (refused with a
clear DevFailed, the old value kept), memorized values that can no longer be restored, and frames that
are symbolic links pointing out of the landing directory."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import tango
from tango_support import BINS, ROT, SUPPORT_DIRS, TRANS, configure, props, wait_for

from pipeline.simulate import Player

pytestmark = [pytest.mark.tango, pytest.mark.timeout(180)]

ON = tango.DevState.ON


def refused(dev, attr, value):
    """Write ``value``; the DevFailed it must raise, as (reason, description) of its first error."""
    with pytest.raises(tango.DevFailed) as info:
        dev.write_attribute(attr, value)
    err = info.value.args[0]
    return err.reason, err.desc


def start_refused(dev, name, command="Start"):
    with pytest.raises(tango.DevFailed) as info:
        dev.command_inout(command, name)
    err = info.value.args[0]
    return err.reason, err.desc


@pytest.fixture
def mask_world(tmp_path, sim_scan):
    """masks/ (the allowed mask directory) with a real mask, links and HDF5 files; outside/ with another mask."""
    masks, outside = tmp_path / "masks", tmp_path / "outside"
    masks.mkdir()
    outside.mkdir()
    shutil.copy(sim_scan.mask_path, masks / "mask.edf")
    shutil.copy(sim_scan.mask_path, outside / "secret_mask.edf")
    (masks / "link_out.edf").symlink_to(outside / "secret_mask.edf")
    (masks / "dir_out").symlink_to(outside, target_is_directory=True)
    (masks / "link_in.edf").symlink_to(masks / "mask.edf")
    data = np.zeros((1679, 1475), np.uint8)
    data[0, :7] = 1
    with h5py.File(outside / "outside.h5", "w") as f:
        f["mask"] = data
    with h5py.File(masks / "masks.h5", "w") as f:
        f["good"] = data
        f["ext"] = h5py.ExternalLink(str(outside / "outside.h5"), "/mask")
    return masks, outside


def test_mask_only_from_mask_directories(make_device, dirs, sim_scan, mask_world):
    masks, outside = mask_world
    dev = make_device(props(*dirs, MaskDirectories=[str(masks)]))
    dev.mask = "mask.edf"  # relative: in the first mask directory; reads back as the real path used
    assert dev.mask == str(masks / "mask.edf")
    good_count = dev.masked_pixels
    assert good_count > 0
    dev.mask = "link_in.edf"  # a link that stays inside is followed (and pinned)
    assert dev.mask == str(masks / "mask.edf")
    dev.mask = "masks.h5::/good"
    assert dev.mask == f"{masks / 'masks.h5'}::/good" and dev.masked_pixels == 7
    dev.mask = str(masks / "mask.edf")

    for value in ("../outside/secret_mask.edf", str(outside / "secret_mask.edf"), "link_out.edf",
                  "dir_out/secret_mask.edf", "dir_out/outside.h5::/mask", f"{outside}/outside.h5::/mask",
                  "sub/../../outside/secret_mask.edf", str(sim_scan.mask_path), "/etc/passwd"):
        reason, desc = refused(dev, "mask", value)
        assert reason == "XRDCT_PathNotAllowed", (value, reason, desc)
        assert str(masks) in desc and "outside the allowed directories" in desc, desc
        assert dev.mask == str(masks / "mask.edf") and dev.masked_pixels == good_count  # old value kept
    assert "through a symbolic link" in refused(dev, "mask", "link_out.edf")[1]

    for value, why in (("masks.h5::/ext", "external link"), ("missing.edf", "does not exist"),
                       ("masks.h5::/nothing", "no dataset"), ("masks.h5::", "HDF5 dataset path")):
        reason, desc = refused(dev, "mask", value)
        assert why in desc, (value, desc)
        assert dev.mask == str(masks / "mask.edf")
    dev.mask = ""  # no mask is always allowed
    assert dev.mask == "" and dev.masked_pixels == 0


def test_scan_with_an_hdf5_mask(make_device, dirs, sim_scan, mask_world):
    """file.h5::/dataset masks pass the path checks at the write and again at Start, and are used."""
    masks, _ = mask_world
    landing, output = dirs
    dev = make_device(props(landing, output, MaskDirectories=[str(masks), *SUPPORT_DIRS]))
    configure(dev, sim_scan, scan="1x1")
    dev.mask = "masks.h5::/good"
    path = dev.Start("h5mask")
    wait_for(lambda: "preparing" not in dev.status())
    Player(sim_scan, landing, rate=0, frames=[0]).run()
    wait_for(lambda: dev.state() == ON, timeout=60)
    assert dev.frames_processed == 1, dev.status()
    with h5py.File(path, "r") as f:
        assert f"{masks / 'masks.h5'}::/good" in f["entry/reduction/configuration"][()].decode()


def test_default_mask_directories(make_device, dirs, sim_scan, tmp_path):
    """Without MaskDirectories: the directories of DefaultMask and DefaultPoni, and OutputDirectory."""
    landing, output = dirs
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(sim_scan.mask_path, calib / "default.edf")
    shutil.copy(sim_scan.mask_path, output / "user.edf")
    base = props(landing, output, DefaultMask=str(calib / "default.edf"))
    base.pop("MaskDirectories")
    dev = make_device(base)
    assert dev.mask == str(calib / "default.edf") and dev.masked_pixels > 0
    reason, desc = refused(dev, "mask", "user.edf")  # relative names go to the first, DefaultMask's directory
    assert "does not exist" in desc and str(calib) in desc
    dev.mask = str(output / "user.edf")
    assert dev.mask == str(output / "user.edf")
    reason, desc = refused(dev, "mask", str(sim_scan.mask_path))
    assert reason == "XRDCT_PathNotAllowed" and str(calib) in desc and str(output) in desc


def test_output_file_only_in_output_directory(make_device, dirs, sim_scan, tmp_path):
    landing, output = dirs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (output / "link_dir").symlink_to(elsewhere, target_is_directory=True)
    (output / "dangling.h5").symlink_to(elsewhere / "planted.h5")
    dev = make_device(props(landing, output))
    configure(dev, sim_scan)
    before = sorted(p.name for p in elsewhere.iterdir())
    for name in ("../escape", "/tmp/abs.h5", str(elsewhere / "x.h5"), "sub/../../x.h5", "link_dir/x.h5",
                 "dangling.h5", "link_dir/"):
        for command in ("Start", "Resume"):
            reason, desc = start_refused(dev, name, command)
            assert reason == "XRDCT_PathNotAllowed", (name, command, reason, desc)
            assert "OutputDirectory" in desc and str(output) in desc, desc
            assert dev.state() == ON
    for name, why in (("a;rm -rf ~", "unusual characters"), ("x\n.h5", "unusual characters"),
                      ("$(id).h5", "unusual characters"), ("y" * 300, "longer than")):
        reason, desc = start_refused(dev, name)
        assert reason == "XRDCT_CannotStart" and why in desc, (name, desc)
    assert sorted(p.name for p in elsewhere.iterdir()) == before  # nothing was written outside
    # an absolute path inside OutputDirectory is fine; names without a NeXus suffix get .h5
    path = dev.Start(str(output / "sample_1.5mm"))
    assert path == str(output / "sample_1.5mm.h5")
    dev.Stop()
    wait_for(lambda: dev.state() == ON, timeout=30)


GOOD_BINS, GOOD_SHAPE = BINS, f"{ROT}x{TRANS}"

BAD_WRITES = [
    # attribute, value, a fragment of the message the client gets
    ("geometry", "Detector: /etc/passwd\nDistance: 1\n", "not a detector name"),
    ("geometry", "SplineFile: /data/x.spline\n", "names a file"),
    ("geometry", "hello: world\n", "unknown PONI key"),
    ("geometry", "Distance: nan\nPoni1: 0\nPoni2: 0\nRot1: 0\nRot2: 0\nRot3: 0\n", "not finite"),
    ("geometry", "Distance: 0.5\nPoni1: 0\nPoni2: 0\nRot1: 0\nRot2: 0\nRot3: 0\nDetector: Pilatus1M\n"
                 "Wavelength: -1e-10\n", "positive wavelength"),
    ("geometry", "Detector: Pilatus1M\nDetector_config: {\"x_offset_file\": \"/etc/shadow\"}\n", "names a file"),
    ("geometry", "# " + "x" * 70_000, "longer than 64 KiB"),
    ("geometry", "", "PONI lacks"),
    ("bins", 0, "minimum authorized"), ("bins", 100_001, "maximum authorized"), ("bins", -5, "minimum authorized"),
    ("unit", 3, "authorized"), ("unit", 65535, "authorized"),
    ("scan_shape", "12", "NROTxNTRANS"), ("scan_shape", "1x2x3", "NROTxNTRANS"), ("scan_shape", "0x5", "1..16384"),
    ("scan_shape", "-1x5", "NROTxNTRANS"), ("scan_shape", "10000x10000", "10,000,000 frames"),
    ("scan_shape", "16385x1", "1..16384"), ("scan_shape", "1e3x2", "NROTxNTRANS"),
    ("scan_shape", "3x4;Start", "NROTxNTRANS"),
    ("sinogram_bin_start", BINS, f"0..{BINS - 1}"), ("sinogram_bin_start", -1, "minimum authorized"),
    ("sinogram_bin_stop", BINS + 1, f"-1..{BINS}"), ("sinogram_bin_stop", -2, "minimum authorized"),
]


def test_bad_values_refused_and_old_values_kept(make_device, dirs, sim_scan):
    dev = make_device(props(*dirs))
    configure(dev, sim_scan, bins=GOOD_BINS, scan=GOOD_SHAPE)
    dev.unit = 1
    dev.sinogram_bin_start = 10
    dev.sinogram_bin_stop = 20
    old = {a: dev.read_attribute(a).value for a in
           ("geometry", "bins", "mask", "unit", "scan_shape", "sinogram_bin_start", "sinogram_bin_stop")}
    for attr, value, why in BAD_WRITES:
        reason, desc = refused(dev, attr, value)
        # our own checks say XRDCT_InvalidValue; Tango's range checks (min/max, enum) come first for numbers
        assert reason in ("XRDCT_InvalidValue", "API_WAttrOutsideLimit"), (attr, value, reason)
        assert why in desc, (attr, value, desc)
        now = dev.read_attribute(attr)
        assert now.value == old[attr], (attr, value, now.value)
    assert dev.state() == ON


def test_range_checks_do_not_depend_on_the_attribute_configuration(make_device, dirs, sim_scan):
    """min_value/max_value can be changed by any client with write access (set_attribute_config); the device
    checks the ranges itself as well."""
    dev = make_device(props(*dirs))
    configure(dev, sim_scan)
    for attr, limit in (("bins", "1000000000"), ("sinogram_bin_start", "1000000000"),
                        ("sinogram_bin_stop", "1000000000")):
        cfg = dev.get_attribute_config(attr)
        cfg.max_value = limit
        cfg.min_value = "-1000000000"
        dev.set_attribute_config(cfg)
    for attr, value, why in (("bins", 200_000, "1..100000"), ("bins", -3, "1..100000"),
                             ("sinogram_bin_start", 10**6, f"0..{BINS - 1}"), ("sinogram_bin_start", -7, "0.."),
                             ("sinogram_bin_stop", 10**6, f"-1..{BINS}"), ("sinogram_bin_stop", -9, "-1..")):
        reason, desc = refused(dev, attr, value)
        assert reason == "XRDCT_InvalidValue" and why in desc, (attr, value, desc)
    assert dev.bins == BINS


def test_writes_refused_while_running(make_device, dirs, sim_scan):
    landing, output = dirs
    dev = make_device(props(landing, output))
    configure(dev, sim_scan)
    dev.Start("running")
    for attr, value in (("geometry", sim_scan.poni_text), ("bins", 100), ("mask", ""), ("unit", 1),
                        ("scan_shape", "2x2")):
        reason, desc = refused(dev, attr, value)
        assert reason == "XRDCT_Busy" and "Stop first" in desc, (attr, desc)
    for command in ("Start", "Resume"):
        with pytest.raises(tango.DevFailed, match="not allowed"):
            dev.command_inout(command, "other")
    dev.Stop()
    wait_for(lambda: dev.state() == ON, timeout=30)
    assert dev.bins == BINS and dev.scan_shape == f"{ROT}x{TRANS}"


def test_symlinked_frame_pointing_outside_the_landing_directory_is_not_read(make_device, dirs, sim_scan,
                                                                             tmp_path):
    """A frame file that is a symbolic link to a (valid) frame outside the landing directory is never
    read: the frame is recorded as missing, the others are reduced."""
    landing, output = dirs
    outside = tmp_path / "outside"
    outside.mkdir()
    linked = 5
    name = sim_scan.filename(linked)
    (outside / name).write_bytes(sim_scan.cbf_bytes(linked))
    (landing / name).symlink_to(outside / name)
    dev = make_device(props(landing, output))
    configure(dev, sim_scan)
    path = dev.Start("links")
    wait_for(lambda: "preparing" not in dev.status())
    frames = [f for f in sim_scan.scan.frames() if f != linked]
    Player(sim_scan, landing, rate=0, frames=frames).run()
    wait_for(lambda: dev.state() == ON, timeout=60)
    assert dev.frames_processed == ROT * TRANS - 1
    assert dev.frames_missing == 1 and dev.frames_failed == 0
    with h5py.File(path, "r") as f:
        numbers = f["entry/integrated/frame_number"][()].tolist()
        status = f["entry/integrated/frame_status"][()]
        assert status[numbers.index(linked)] == 2  # missing, never read
        assert np.isnan(f["entry/integrated/intensity"][numbers.index(linked)]).all()


def _db_server(landing, output, mask_dirs):
    from tango_ds.device import XRDCTReducer

    return dict(server_instance="XRDCTReducer/sec", device_classes={XRDCTReducer: {"xrdct/reducer/sec": {
        "properties": {"LandingDirectory": [str(landing)], "OutputDirectory": [str(output)], "Engine": ["cpu"],
                       "MissingTimeout": ["2.0"], "MaskDirectories": [str(d) for d in mask_dirs]}}}})


def test_memorized_values_refused_writes_and_restore(pytango_db, dirs, sim_scan, tmp_path):
    """In a real database: a refused write leaves the memorized value alone; a memorized mask that is no
    longer allowed after a restart is not silently dropped: Status says so and Start refuses until the
    mask is written again."""
    pytest.importorskip("databaseds")
    from databaseds.fixtures import run_device_server

    landing, output = dirs
    first, second = tmp_path / "masks_a", tmp_path / "masks_b"
    first.mkdir()
    second.mkdir()
    shutil.copy(sim_scan.mask_path, first / "mask.edf")
    with run_device_server(**_db_server(landing, output, [first]), cleanup_db=False) as (dev,):
        dev.geometry = sim_scan.poni_text
        dev.bins = BINS
        dev.scan_shape = f"{ROT}x{TRANS}"
        dev.mask = "mask.edf"
        assert refused(dev, "mask", "../masks_b/x.edf")[0] == "XRDCT_PathNotAllowed"
        assert refused(dev, "bins", 0)[0] in ("XRDCT_InvalidValue", "API_WAttrOutsideLimit")
        assert refused(dev, "geometry", "Detector: /etc/passwd\n")[0] == "XRDCT_InvalidValue"
    stored = tango.Database().get_device_attribute_property("xrdct/reducer/sec", ["mask", "bins", "geometry"])
    assert stored["mask"]["__value"] == [str(first / "mask.edf")]
    assert stored["bins"]["__value"] == [str(BINS)]
    geometry = "\n".join(stored["geometry"]["__value"])
    assert "Pilatus CdTe 2M" in geometry and "/etc/passwd" not in geometry

    # the facility moves the masks: the memorized one is outside the new MaskDirectories
    with run_device_server(**_db_server(landing, output, [second])) as (dev,):
        assert dev.bins == BINS and dev.scan_shape == f"{ROT}x{TRANS}"  # the others were restored
        status = dev.status()
        assert "memorized mask could not be restored" in status and "write mask again" in status, status
        reason, desc = start_refused(dev, "x")
        assert reason == "XRDCT_CannotStart" and "write mask again" in desc, desc
        dev.Init()  # Init re-applies the memorized values: still refused, still reported
        assert "memorized mask could not be restored" in dev.status()
        dev.mask = ""  # the operator decides: no mask (or one inside the new directories)
        assert "could not be restored" not in dev.status()
        assert dev.Start("after_restore").endswith("after_restore.h5")
        dev.Stop()
        wait_for(lambda: dev.state() == ON, timeout=30)
