"""Malformed input gives a clear error, never a crash, a hang or a wrong array (hypothesis fuzzing).

The parser and both decoders (numba on the CPU, OpenCL on PoCL) get random bytes, and valid CBF files
with bytes flipped, cut, inserted or with header numbers changed.  The only acceptable outcomes: a
:class:`CbfError` subclass, or a frame decoded exactly as fabio decodes it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _support import write_cbf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cbf, decode

SETTINGS = settings(max_examples=int(os.environ.get("XRDCT_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def valid_blob(tmp_path_factory):
    rng = np.random.default_rng(7)
    data = rng.poisson(30, (23, 37)).astype(np.int32)
    flat = data.reshape(-1)
    flat[::17] = rng.integers(-2**31, 2**31 - 1, flat[::17].size, dtype=np.int64).astype(np.int32)  # 32-bit escapes
    data[3, :5] = -1
    path = write_cbf(tmp_path_factory.mktemp("fuzz") / "v.cbf", data)
    return path.read_bytes()


def parse_and_decode(blob: bytes):
    """Our result for a blob: an int32 array, or the CbfError raised."""
    try:
        frame = cbf.parse_frame(blob, check_md5=False)
        return decode.decode(frame)
    except cbf.CbfError as exc:
        return exc


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash(blob):
    out = parse_and_decode(blob)
    assert isinstance(out, (np.ndarray, cbf.CbfError))


@SETTINGS
@given(data=st.data())
def test_mutated_files_fail_cleanly_or_decode_like_fabio(valid_blob, data):
    blob = bytearray(valid_blob)
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "number"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    else:  # change a number of the MIME header
        head = bytes(blob[: bytes(blob).find(cbf.BINARY_MARKER)])
        key = data.draw(st.sampled_from([b"X-Binary-Size: ", b"X-Binary-Number-of-Elements: ",
                                         b"X-Binary-Size-Fastest-Dimension: ", b"X-Binary-Size-Second-Dimension: "]))
        start = head.find(key) + len(key)
        end = head.find(b"\r", start)
        value = str(data.draw(st.integers(-5, 10**7))).encode()
        blob[start:end] = value
    out = parse_and_decode(bytes(blob))
    if isinstance(out, np.ndarray):  # whatever we accept must be what fabio decodes
        from fabio.compression import decByteOffset

        frame = cbf.parse_frame(bytes(blob))
        expected = np.asarray(decByteOffset(bytes(frame.raw), size=frame.header.n_elements)).astype(np.int32)
        assert np.array_equal(out.reshape(-1), expected)
    else:
        assert isinstance(out, cbf.CbfError) and str(out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=4), st.integers(1, 600))
def test_opencl_decoder_agrees_with_cpu_on_random_streams(streams, n_pixels):
    """Random byte streams through the device decoder: same values as the CPU, or an error for the frame."""
    pytest.importorskip("pyopencl")
    from pipeline.opencl.engine import find_device

    device = find_device()
    if device is None:
        pytest.skip("no OpenCL device")
    engine = _engine(device, n_pixels)
    frames = [_frame(s, n_pixels) for s in streams]
    device_out = engine.decode_batch(frames)
    for frame, got in zip(frames, device_out):
        out = np.zeros(n_pixels, np.int32)
        count, _, status = decode.decode_into(np.frombuffer(frame.raw, np.uint8), out)
        cpu_ok = status == decode.OK and count == n_pixels
        if cpu_ok:
            assert isinstance(got, np.ndarray), got
            assert np.array_equal(got.reshape(-1), out)
        else:
            assert isinstance(got, cbf.CorruptCbfError)


_ENGINES: dict = {}


def _engine(device, n_pixels):
    """One engine per frame size (kernels compile once)."""
    from pipeline.config import ReductionConfig
    from pipeline.geometry import build_setup
    from pipeline.opencl.engine import OpenCLEngine

    if n_pixels not in _ENGINES:
        poni = ("Distance: 0.1\nPoni1: 0.001\nPoni2: 0.001\nRot1: 0\nRot2: 0\nRot3: 0\n"
                "PixelSize1: 0.0001\nPixelSize2: 0.0001\nWavelength: 1e-10\n")
        setup = build_setup(ReductionConfig(poni_text=poni, bins=4), shape=(1, n_pixels))
        _ENGINES[n_pixels] = OpenCLEngine(setup, device, batch_size=4, slots=1, staging_frames=8,
                                          staging_bytes=16384, pack_threads=0)
    return _ENGINES[n_pixels]


def _frame(stream: bytes, n_pixels: int) -> cbf.CbfFrame:
    header = cbf.CbfHeader(binary_offset=0, binary_size=len(stream), n_elements=n_pixels, shape=(1, n_pixels))
    return cbf.CbfFrame(header, memoryview(stream))


def test_no_memory_growth_under_mutated_input(valid_blob):
    """Thousands of malformed files through the parser, the header fast path and the decoder: the Python
    heap (tracemalloc) and resident memory do not grow with the number of files."""
    import random
    import tracemalloc

    from pipeline.cbf_fast import HeaderTemplate, frames_from_run
    from pipeline.soak import rss_mb

    rng = random.Random(3)
    template = HeaderTemplate(cbf.parse_frame(valid_blob).header)

    def mutated() -> bytes:
        blob = bytearray(valid_blob)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        if rng.random() < 0.3:
            blob = blob[: rng.randrange(len(blob))]
        return bytes(blob)

    def run(n: int) -> None:
        for _ in range(n):
            blob = mutated()
            parse_and_decode(blob)
            region = np.frombuffer(blob + bytes(64), np.uint8).copy()
            try:
                frames_from_run(template, region, np.zeros(1, np.int64), np.array([len(blob)], np.int64))
            except cbf.CbfError:
                pass

    run(500)  # warm-up: compiled functions, caches, allocator arenas
    tracemalloc.start()
    before_heap = tracemalloc.take_snapshot()
    before_rss = rss_mb()
    run(4000)
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before_heap, "filename"))
    tracemalloc.stop()
    assert growth < 256 * 1024, f"Python heap grew by {growth} bytes over 4000 malformed files"
    assert rss_mb() - before_rss < 32, f"resident memory grew by {rss_mb() - before_rss:.1f} MB"
