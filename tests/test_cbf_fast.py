"""The compiled header check (pipeline.cbf_fast) gives parse_frame's header, or leaves the frame to it."""

from __future__ import annotations

import random

import numpy as np
import pytest
from _support import real_file, write_cbf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cbf
from pipeline.cbf_fast import HeaderTemplate, frames_from_run
from pipeline.fastio import read_packed

REAL_NAMES = ["ndtomo/CeO2.cbf", "cbf-ctypes/agbeh_long.cbf", "giscan/example.cbf",
              "dials-data-files/l-cyst_01_00001.cbf", "fabio-history/run2_1_00148.cbf"]


def packed(blobs: list[bytes]):
    """The files back to back in one buffer, as a reader thread leaves them."""
    align = 256
    offsets, pos = [], 0
    for b in blobs:
        offsets.append(pos)
        pos += (len(b) + align - 1) // align * align
    region = np.zeros(pos + 64, np.uint8)
    for off, b in zip(offsets, blobs):
        region[off:off + len(b)] = np.frombuffer(b, np.uint8)
    return region, np.array(offsets, np.int64), np.array([len(b) for b in blobs], np.int64)


def check_run(blobs: list[bytes], template_blob: bytes, check_md5: bool = False) -> int:
    """Every frame the fast path returns equals parse_frame's; returns how many it took."""
    template = HeaderTemplate(cbf.parse_frame(template_blob).header)
    region, offsets, got = packed(blobs)
    fast = frames_from_run(template, region, offsets, got, check_md5)
    taken = 0
    for blob, frame in zip(blobs, fast):
        if frame is None:
            continue
        taken += 1
        full = cbf.parse_frame(blob, check_md5)
        assert frame.header == full.header
        assert bytes(frame.raw) == bytes(full.raw)
    return taken


def test_simulated_frames_of_a_scan_all_take_the_fast_path(tmp_path):
    rng = np.random.default_rng(1)
    blobs = []
    for i in range(6):
        image = rng.poisson(50, (97, 131)).astype(np.int32)
        image.flat[rng.integers(0, image.size, 10 * i + 1)] = 70_000  # escapes: sizes differ from frame to frame
        blobs.append(write_cbf(tmp_path / f"{i}.cbf", image).read_bytes())
    assert len({cbf.parse_frame(b).header.binary_size for b in blobs}) > 1  # sizes and digests differ
    assert check_run(blobs, blobs[0]) == 6
    assert check_run(blobs, blobs[0], check_md5=True) == 6


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_pilatus_files_match_themselves(name, real_dir):
    blob = real_file(name, real_dir).read_bytes()
    template = HeaderTemplate(cbf.parse_frame(blob).header)
    if not template.usable:
        pytest.skip(f"{name}: header layout not eligible for the fast path (parsed in full)")
    assert check_run([blob, blob], blob) == 2


def test_other_layouts_and_bad_files_are_left_to_the_full_parser(tmp_path):
    data = np.arange(97 * 131, dtype=np.int32).reshape(97, 131) % 700
    good = write_cbf(tmp_path / "a.cbf", data).read_bytes()
    other_shape = write_cbf(tmp_path / "b.cbf", data[:, :130].copy()).read_bytes()
    truncated = good[: len(good) - 100]
    not_cbf = b"#xxCBF" + good[6:]
    other_conversion = good.replace(b"x-CBF_BYTE_OFFSET", b"x-CBF_PACKED_V2_")
    bad_size = good.replace(b"X-Binary-Size: ", b"X-Binary-Size: 9", 1)
    bad_md5 = bytearray(good)
    bad_md5[-50] ^= 1
    blobs = [good, other_shape, truncated, not_cbf, other_conversion, bad_size]
    template = HeaderTemplate(cbf.parse_frame(good).header)
    region, offsets, got = packed(blobs)
    fast = frames_from_run(template, region, offsets, got)
    assert fast[0] is not None and all(f is None for f in fast[1:])
    with pytest.raises(cbf.CorruptCbfError):  # the digest is checked like parse_frame does
        region, offsets, got = packed([bytes(bad_md5)])
        frames_from_run(template, region, offsets, got, check_md5=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_headers_never_differ_from_the_full_parser(tmp_path, data):
    """Random byte changes in the header: the fast path either agrees with parse_frame or declines."""
    path = tmp_path / "t.cbf"
    if not path.exists():
        write_cbf(path, np.arange(40 * 50, dtype=np.int32).reshape(40, 50) % 300)
    good = path.read_bytes()
    marker = good.find(cbf.BINARY_MARKER)
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, marker + 3))
        blob[pos] = data.draw(st.sampled_from([0x20, 0x30, 0x39, 0x0A, 0x0D, 0x3A, 0x2D, ord("X"), ord("="),
                                               random.Random(pos).randrange(256)]))
    template = HeaderTemplate(cbf.parse_frame(good).header)
    region, offsets, got = packed([bytes(blob)])
    frame = frames_from_run(template, region, offsets, got)[0]
    if frame is None:
        return
    full = cbf.parse_frame(bytes(blob))  # must not raise: the fast path accepted it
    assert frame.header == full.header and bytes(frame.raw) == bytes(full.raw)


def test_read_packed_then_fast_headers_end_to_end(tmp_path):
    rng = np.random.default_rng(2)
    paths = [write_cbf(tmp_path / f"{i}.cbf", rng.poisson(9, (64, 80)).astype(np.int32)) for i in range(5)]
    region = np.zeros(1 << 20, np.uint8)
    offsets, got, _ = read_packed(paths, region)
    template = HeaderTemplate(cbf.read_frame(paths[0]).header)
    fast = frames_from_run(template, region, offsets, got)
    for p, frame in zip(paths, fast):
        assert frame is not None and frame.header == cbf.read_frame(p).header


def test_templates_whose_lines_parse_header_splits_otherwise_are_not_used(tmp_path):
    """A lone CR starts a line for parse_header (and a key may then appear twice): such a layout is parsed
    in full, frame by frame, never through the compiled check."""
    good = write_cbf(tmp_path / "a.cbf", np.arange(12 * 10, dtype=np.int32).reshape(12, 10)).read_bytes()
    head = cbf.parse_header(good)
    size_line = f"X-Binary-Size: {head.binary_size}".encode()
    tricky = good.replace(size_line, b"Y: 1\r" + f"X-Binary-Size: {head.binary_size + 100}".encode() + b"\r\n"
                          + size_line, 1)
    parsed = cbf.parse_header(tricky)
    assert parsed.binary_size == head.binary_size + 100  # what the full parser reads: the first line
    template = HeaderTemplate(parsed)
    assert not template.usable
    region, offsets, got = packed([tricky])
    assert frames_from_run(template, region, offsets, got) == [None]
