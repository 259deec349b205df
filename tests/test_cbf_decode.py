"""CBF container and CPU byte-offset decoding, against fabio bit for bit."""

from __future__ import annotations

import hashlib

import fabio
import numpy as np
import pytest
from _support import REAL, real_file, write_cbf

from pipeline import cbf, decode

REAL_CBFS = [
    "ndtomo/CeO2.cbf", "cbf-ctypes/agbeh_long.cbf", "giscan/example.cbf", "dials-data-files/l-cyst_01_00001.cbf",
    "fabio-history/run2_1_00148.cbf", "dials-data-files/thau_3_2_0001.cbf", "dials-data-files/thau_3_2_0019.cbf",
    "dials-data-files/DLS_I03_smargon_0001.cbf", "dials-data-files/DLS_I23_P12M_thau_00001.cbf",
]


def crosscheck_digests() -> dict[str, str]:
    """sha256 of each decoded array, as published beside the data (CROSSCHECK.txt)."""
    path = REAL / "CROSSCHECK.txt"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if "sha256" in line:
            name = line.split(":", 1)[0].strip()
            out[name] = line.rsplit("=", 1)[1].strip()
    return out


def synthetic(shape, rng, kind: str) -> np.ndarray:
    """Frames that exercise each escape width and the Pilatus negative markers."""
    if kind == "small":
        data = rng.poisson(20, shape)
    elif kind == "16bit":
        data = rng.integers(-30000, 30000, shape)
    elif kind == "32bit":
        data = rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int64)
    elif kind == "mixed":
        data = rng.poisson(50, shape)
        flat = data.reshape(-1)
        a, b, c = np.array_split(rng.choice(flat.size, min(flat.size, max(3, flat.size // 5)), replace=False), 3)
        flat[a] = rng.integers(200, 30000, len(a))  # 16-bit deltas
        flat[b] = rng.integers(2**20, 2**31 - 1, len(b))  # 32-bit deltas
        flat[c] = rng.choice([-1, -2], len(c))  # gaps and bad pixels
    elif kind == "extremes":
        data = np.resize(np.array([2**31 - 1, -2**31, 0, -1, -2, 127, -127, 128, -128, 32767, -32768,
                                   32768, -32769], dtype=np.int64), shape)
    else:
        raise ValueError(kind)
    return data.astype(np.int32)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (195, 487), (1679, 1475)])
@pytest.mark.parametrize("kind", ["small", "16bit", "32bit", "mixed", "extremes"])
def test_decode_equals_fabio(tmp_path, shape, kind):
    rng = np.random.default_rng(hash((shape, kind)) & 0xFFFF)
    data = synthetic(shape, rng, kind)
    path = write_cbf(tmp_path / "f.cbf", data)
    ours = decode.decode(cbf.read_frame(path, check_md5=True))
    ref = fabio.open(str(path)).data
    assert ours.dtype == ref.dtype == np.int32
    assert ours.shape == ref.shape == shape
    assert np.array_equal(ours, ref)
    if kind != "extremes":  # deltas beyond 32 bits wrap in fabio's encoder; equality with fabio is the contract
        assert np.array_equal(ours, data)


def test_decode_64bit_escape_equals_fabio():
    """A hand-made stream with a 64-bit escape (never written by Pilatus, valid CBF)."""
    from fabio.compression import decByteOffset

    stream = bytes([5]) + b"\x80\x00\x80" + b"\x00\x00\x00\x80" + (1000).to_bytes(8, "little", signed=True) + bytes([3])
    src = np.frombuffer(stream, np.uint8)
    out = np.zeros(3, np.int32)
    count, used, status = decode.decode_into(src, out)
    assert (count, used, status) == (3, len(stream), decode.OK)
    assert np.array_equal(out, np.asarray(decByteOffset(stream, size=3)).astype(np.int32))


@pytest.mark.parametrize("name", REAL_CBFS)
def test_real_files_equal_fabio_and_crosscheck(real_dir, name):
    path = real_file(name, real_dir)
    frame = cbf.read_frame(path, check_md5=True)
    ours = decode.decode(frame)
    assert np.array_equal(ours, fabio.open(str(path)).data)
    digest = crosscheck_digests().get(name)
    assert digest is not None, f"{name} missing from CROSSCHECK.txt"
    assert hashlib.sha256(ours.astype("<i4").tobytes()).hexdigest() == digest


def test_pilatus_header_fields(real_dir):
    frame = cbf.read_frame(real_file("fabio-history/run2_1_00148.cbf", real_dir))
    pil = frame.header.pilatus
    assert pil["wavelength"] == pytest.approx(1.0332)
    assert pil["detector_distance"] == pytest.approx(0.3)
    assert pil["beam_xy"] == pytest.approx((1230.10, 1310.50))
    assert frame.shape == (2527, 2463)
    agbeh = cbf.read_frame(real_file("cbf-ctypes/agbeh_long.cbf", real_dir)).header.pilatus
    assert agbeh["pixel_size"] == pytest.approx((172e-6, 172e-6))  # "Pixel size" with a space (SLS_1.0)
    assert "PILATUS" in agbeh["detector"]


def test_truncated_file_is_incomplete_not_decoded(tmp_path):
    data = synthetic((31, 17), np.random.default_rng(1), "mixed")
    blob = write_cbf(tmp_path / "f.cbf", data).read_bytes()
    head = cbf.parse_header(blob)
    for cut in (0, 3, 20, head.binary_offset - 2, head.binary_offset + 10, head.required_size - 1):
        part = tmp_path / f"cut{cut}.cbf"
        part.write_bytes(blob[:cut])
        assert not cbf.is_complete(part)
        with pytest.raises(cbf.IncompleteCbfError):
            cbf.read_frame(part)
    assert cbf.is_complete(tmp_path / "f.cbf")


def test_garbage_and_corruption_give_clear_errors(tmp_path):
    with pytest.raises(cbf.NotACbfError):
        cbf.parse_frame(b"\x89PNG\r\n\x1a\n" + bytes(100))
    data = synthetic((9, 11), np.random.default_rng(2), "mixed")
    blob = bytearray(write_cbf(tmp_path / "f.cbf", data).read_bytes())
    head = cbf.parse_header(bytes(blob))
    flipped = bytearray(blob)
    flipped[head.binary_offset + 5] ^= 0x11
    with pytest.raises(cbf.CorruptCbfError, match="MD5"):
        cbf.parse_frame(bytes(flipped), check_md5=True)
    # a stream cut inside an escape: announce fewer bytes than the encoder wrote
    short = bytes(blob).replace(f"X-Binary-Size: {head.binary_size}".encode(),
                                f"X-Binary-Size: {head.binary_size - 1}".encode())
    frame = cbf.parse_frame(short)
    with pytest.raises(cbf.CorruptCbfError):
        decode.decode(frame)
    wrong_dims = bytes(blob).replace(b"X-Binary-Size-Second-Dimension: 9", b"X-Binary-Size-Second-Dimension: 8")
    with pytest.raises(cbf.CorruptCbfError, match="element count"):
        cbf.parse_frame(wrong_dims)
