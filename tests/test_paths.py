"""Client-given names stay inside their directories (pipeline.paths), strict parsing of client text
(PONI, scan shape), HDF5 masks that would read other files, and what the landing source does with
symbolic links."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import ConfigError, parse_poni, parse_scan_shape
from pipeline.geometry import load_mask
from pipeline.paths import PathError, is_under, resolve_mask, resolve_under
from pipeline.source import LandingSource


@pytest.fixture
def tree(tmp_path):
    """base/ (allowed, with sub/ and f.txt), other/ (not allowed, with secret.txt), links inside base."""
    base, other = tmp_path / "base", tmp_path / "other"
    (base / "sub").mkdir(parents=True)
    other.mkdir()
    (base / "f.txt").write_text("ok")
    (base / "sub" / "g.txt").write_text("ok")
    (other / "secret.txt").write_text("secret")
    (base / "to_secret.txt").symlink_to(other / "secret.txt")  # file link pointing outside
    (base / "to_other").symlink_to(other, target_is_directory=True)  # directory link pointing outside
    (base / "to_f.txt").symlink_to(base / "f.txt")  # link staying inside
    (base / "dangling.h5").symlink_to(other / "new.h5")  # link to a file that does not exist yet, outside
    return base, other


def test_names_inside_are_resolved(tree):
    base, _ = tree
    assert resolve_under([base], "f.txt", "file") == base / "f.txt"
    assert resolve_under([base], "sub/g.txt", "file") == base / "sub" / "g.txt"
    assert resolve_under([base], "sub/../f.txt", "file") == base / "f.txt"
    assert resolve_under([base], str(base / "sub" / "g.txt"), "file") == base / "sub" / "g.txt"
    assert resolve_under([base], "to_f.txt", "file") == base / "f.txt"  # a link that stays inside is fine
    assert resolve_under([base], "new/x.h5", "file") == base / "new" / "x.h5"  # need not exist
    assert is_under(base / "f.txt", [base]) and not is_under(base / "to_secret.txt", [base])


@pytest.mark.parametrize("name", ["../other/secret.txt", "sub/../../other/secret.txt", "..", ".", "",
                                  "/etc/passwd", "to_secret.txt", "to_other/secret.txt", "to_other/new.h5",
                                  "dangling.h5", "a\x00b", "x" * 5000])
def test_names_leaving_are_refused(tree, name):
    base, other = tree
    with pytest.raises(PathError if name and "\x00" not in name and len(name) < 5000 else ConfigError) as info:
        resolve_under([base], name, "output file")
    text = str(info.value)
    assert "output file" in text
    if name and "\x00" not in name and len(name) < 5000:
        assert str(base) in text  # the message names the allowed directories


def test_refusal_says_when_a_link_leads_out(tree):
    base, _ = tree
    with pytest.raises(PathError, match="through a symbolic link"):
        resolve_under([base], "to_secret.txt", "mask file")
    with pytest.raises(PathError, match="through a symbolic link"):
        resolve_under([base], "to_other/secret.txt", "mask file")
    with pytest.raises(PathError) as info:
        resolve_under([base], "../other/secret.txt", "mask file")
    assert "symbolic link" not in str(info.value)


def test_prefix_of_a_name_is_not_a_parent(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "output2").mkdir()
    with pytest.raises(PathError):
        resolve_under([tmp_path / "out"], str(tmp_path / "output2" / "x.h5"), "output file")


def test_several_bases_and_a_base_reached_through_a_link(tree, tmp_path):
    base, other = tree
    # relative names go to the first base; absolute names may be in any
    assert resolve_under([other, base], "secret.txt", "f") == other / "secret.txt"
    assert resolve_under([other, base], str(base / "f.txt"), "f") == base / "f.txt"
    # a configured base that is itself a link (/data/visitor/current -> ...) is resolved too
    current = tmp_path / "current"
    current.symlink_to(base, target_is_directory=True)
    assert resolve_under([current], "f.txt", "f") == base / "f.txt"
    assert resolve_under([current], str(base / "f.txt"), "f") == base / "f.txt"
    with pytest.raises(PathError, match="no directory is configured"):
        resolve_under([], "f.txt", "mask file")
    with pytest.raises(PathError, match="no directory is configured"):
        resolve_under(["", "  "], "f.txt", "mask file")


def test_must_exist(tree):
    base, _ = tree
    assert resolve_under([base], "f.txt", "mask file", must_exist=True) == base / "f.txt"
    with pytest.raises(ConfigError, match="does not exist") as info:
        resolve_under([base], "missing.edf", "mask file", must_exist=True)
    assert not isinstance(info.value, PathError)  # not a confinement refusal: the name is allowed, the file absent
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_under([base], "sub", "mask file", must_exist=True)  # a directory is not a mask


def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f[name] = data
    return path


def test_hdf5_mask_spec_is_confined_by_its_file_part(tree):
    base, other = tree
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 2] = 1
    _h5(base / "m.h5", mask=mask)
    _h5(other / "m.h5", mask=mask)
    assert resolve_mask([base], "m.h5::/mask") == f"{base / 'm.h5'}::/mask"
    assert resolve_mask([base], "m.h5") == str(base / "m.h5")
    assert load_mask("m.h5::/mask", allowed=[base]).sum() == 1
    for spec in ("../other/m.h5::/mask", f"{other}/m.h5::/mask", "to_other/m.h5::/mask"):
        with pytest.raises(PathError):
            resolve_mask([base], spec)
        with pytest.raises(PathError):
            load_mask(spec, allowed=[base])
    for spec in ("m.h5::", "nope.h5::/x"):  # allowed place, unusable name
        with pytest.raises(ConfigError):
            resolve_mask([base], spec)
    for spec in ("m.h5::", "nope.h5::/x", "m.h5::/nope"):
        with pytest.raises(ConfigError):
            load_mask(spec, allowed=[base])


def test_config_accepts_an_hdf5_mask_spec(tree):
    from pipeline.config import ReductionConfig
    from pipeline.simulate import SimulatedScan

    base, _ = tree
    _h5(base / "m.h5", mask=np.zeros((4, 5), np.uint8))
    config = ReductionConfig(poni_text=SimulatedScan(2, 2).poni_text, mask_path=f"{base / 'm.h5'}::/mask")
    config.validate()
    config.mask_path = f"{base / 'nope.h5'}::/mask"
    with pytest.raises(ConfigError, match="does not exist"):
        config.validate()


def test_hdf5_mask_that_reads_other_files_is_refused(tree):
    base, other = tree
    mask = np.ones((4, 5), np.uint8)
    _h5(other / "outside.h5", mask=mask)
    (other / "raw.bin").write_bytes(bytes(20))
    with h5py.File(base / "tricks.h5", "w") as f:
        f["plain"] = mask
        f["ext"] = h5py.ExternalLink(str(other / "outside.h5"), "/mask")  # a link to a dataset in another file
        f.create_group("g")["deeper"] = h5py.ExternalLink(str(other / "outside.h5"), "/")
        f.create_dataset("raw", shape=(4, 5), dtype=np.uint8, external=[(str(other / "raw.bin"), 0, 20)])
        layout = h5py.VirtualLayout(shape=(4, 5), dtype=np.uint8)
        layout[:] = h5py.VirtualSource(str(other / "outside.h5"), "mask", shape=(4, 5))
        f.create_virtual_dataset("virtual", layout)
        f["soft"] = h5py.SoftLink("/ext")  # a soft link onto the external link
    spec = str(base / "tricks.h5")
    assert load_mask(spec + "::/plain").all()
    for inner, why in (("/ext", "external link"), ("/g/deeper/mask", "external link"), ("/soft", "another file"),
                       ("/raw", "other files"), ("/virtual", "other files")):
        with pytest.raises(ConfigError, match=why):
            load_mask(f"{spec}::{inner}")
    # without '::' the one plain 2D dataset is not enough: links are never followed to count candidates
    with pytest.raises(ConfigError, match="name the mask dataset"):
        load_mask(spec)


POSE = "Distance: 0.5\nPoni1: 0.1\nPoni2: 0.1\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\n"


@pytest.mark.parametrize("extra, why", [
    ("Detector: /etc/passwd\n", "not a detector name"),
    ("Detector: ../some/detector.h5\n", "not a detector name"),
    ("Detector: NoSuchDetector\n", "not a detector"),
    ("Detector: NexusDetector\nDetector_config: {}\n", "not a detector"),
    ("Detector: Pilatus1M\nDetector_config: {\"splineFile\": \"/etc/x.spline\"}\n", "names a file"),
    ("Detector: Pilatus1M\nDetector_config: {\"x_offset_file\": \"/x.edf\"}\n", "names a file"),
    ("Detector: Pilatus1M\nDetector_config: [3]\n", "JSON object"),
    ("Detector: Pilatus1M\nDetector_config: {\"orientation\": 12}\n", "orientation"),
    ("Detector: Pilatus1M\nDetector_config: {oops\n", "not valid JSON"),
    ("PixelSize1: 1e-4\nPixelSize2: 1e-4\nSplineFile: /data/distortion.spline\n", "names a file"),
    ("PixelSize1: -1e-4\nPixelSize2: 1e-4\n", "pixelsize1 must be positive"),
    ("Detector: Pilatus1M\nporn_version: 2\n", "unknown PONI key"),
    ("Detector: Pilatus1M\nponi_version: two\n", "poni_version is not a number"),
    ("Detector: Pilatus1M\nparallax: maybe\n", "parallax"),
    ("Detector: Pilatus1M\nDistance: nan\n", "not finite"),
    ("Detector: Pilatus1M\n__import__('os').system('id'): 1\n", "unknown PONI key"),
])
def test_poni_refuses_file_references_and_odd_values(extra, why):
    with pytest.raises(ConfigError, match=why):
        parse_poni(POSE + extra)


def test_poni_accepts_what_pyfai_writes():
    from pipeline.simulate import SimulatedScan

    parse_poni(SimulatedScan(2, 2).poni_text)  # poni_version 2.1, "Pilatus CdTe 2M", orientation 3
    parse_poni(POSE + "PixelSize1: 1e-4\nPixelSize2: 1e-4\nSplineFile: None\n")  # version 1 files
    parse_poni(POSE + "Detector: Frelon\nDetector_config: {\"splineFile\": null}\n")
    parse_poni(POSE + "poni_version: 3\nDetector: Pilatus1M\nDetector_config: {\"orientation\": 3}\nparallax: False\n")


def test_poni_detector_name_that_is_also_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("Pilatus1M").write_text("pyFAI would open this as a NeXus detector file")
    with pytest.raises(ConfigError, match="also a file name"):
        parse_poni(POSE + "Detector: Pilatus1M\n")


@pytest.mark.parametrize("text, shape", [("180x100", (180, 100)), (" 3 X 4 ", (3, 4)), ("16384x610", (16384, 610))])
def test_scan_shape_accepted(text, shape):
    assert parse_scan_shape(text) == shape


@pytest.mark.parametrize("text", ["12", "1x2x3", "0x5", "5x0", "-1x5", "1.5x2", "1e3x2", "１x２", "1_0x2", "x",
                                  "16385x1", "1x16385", "4000x4000", "3x4; rm -rf /", ""])
def test_scan_shape_refused(text):
    with pytest.raises(ConfigError, match="scan shape"):
        parse_scan_shape(text)


# -- the landing source and symbolic links ------------------------------------------------------------

def _landing_with_a_link(tmp_path):
    landing, outside = tmp_path / "landing", tmp_path / "outside"
    landing.mkdir()
    outside.mkdir()
    for n in (0, 2):
        (landing / f"frame_{n:05d}.cbf").write_bytes(b"frame %d" % n)
    (outside / "secret.cbf").write_bytes(b"not the detector's")
    (landing / "frame_00001.cbf").symlink_to(outside / "secret.cbf")
    return landing


def _run_offline(location, frames=(0, 1, 2)):
    events: list[tuple[str, str]] = []
    refs = []
    source = LandingSource(location, frames=frames, live=False, on_event=lambda k, t: events.append((k, t)))
    source.run(refs.append, threading.Event())
    return refs, events


def test_landing_symlink_pointing_outside_is_never_read(tmp_path):
    """A frame name that is a symbolic link (here to a file outside the landing directory) is not handed on:
    the frame is recorded as missing, the file it points to is never opened."""
    landing = _landing_with_a_link(tmp_path)
    refs, events = _run_offline(landing)
    by_frame = {r.frame: r for r in refs}
    assert sorted(by_frame) == [0, 1, 2]
    assert by_frame[1].missing and by_frame[1].path is None
    assert by_frame[0].path == landing / "frame_00000.cbf" and not by_frame[0].missing
    assert all(r.path is None or not os.path.islink(r.path) for r in refs)
    assert any(kind == "missing" and "frame 1" in text for kind, text in events)


def test_landing_symlink_is_reported_as_such(tmp_path):
    landing = _landing_with_a_link(tmp_path)
    _, events = _run_offline(landing)
    assert any("frame_00001.cbf" in text and "symbolic link" in text for _, text in events), events


def test_landing_glob_does_not_follow_symlinks(tmp_path):
    landing = _landing_with_a_link(tmp_path)
    refs, _ = _run_offline(str(landing / "frame_*.cbf"))
    assert all(r.path is None or not os.path.islink(r.path) for r in refs), [r.path for r in refs]
