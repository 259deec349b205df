"""Pilatus miniCBF container: header, binary section, completeness.

The parser never decodes pixels: it locates the byte-offset stream so that a
decoder (CPU or OpenCL) can take it as it is, and it tells a complete file
from one that is still being written or was cut short.  Being strict here is
what keeps a half-written NFS file from turning into a silently wrong frame.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np

CBF_MAGIC = b"###CBF"
BINARY_MARKER = b"\x0c\x1a\x04\xd5"
#: The header of every real Pilatus file fits in far less; a larger search
#: window only costs time on garbage files.
MAX_HEADER_BYTES = 64 * 1024
HEADER_PROBE = 8192  # bytes read first to find a header; a Pilatus header fits in a few KiB

_MIME_KEYS = {
    b"X-Binary-Size": "binary_size",
    b"X-Binary-Number-of-Elements": "n_elements",
    b"X-Binary-Size-Fastest-Dimension": "dim_fast",
    b"X-Binary-Size-Second-Dimension": "dim_slow",
    b"X-Binary-Size-Padding": "padding",
}
_CONVERSIONS_RE = re.compile(rb'conversions\s*=\s*"?([A-Za-z0-9_-]+)"?')
_FLOAT = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_PILATUS_PATTERNS = {
    "detector": re.compile(r"^#\s*Detector:\s*(.+?)\s*$", re.M),
    "exposure_time": re.compile(r"^#\s*Exposure_time:?\s*" + _FLOAT + r"\s*s", re.M),
    "exposure_period": re.compile(r"^#\s*Exposure_period:?\s*" + _FLOAT + r"\s*s", re.M),
    "wavelength": re.compile(r"^#\s*Wavelength:?\s*" + _FLOAT + r"\s*A", re.M),
    "detector_distance": re.compile(r"^#\s*Detector_distance:?\s*" + _FLOAT + r"\s*m\b", re.M),
    "pixel_size": re.compile(r"^#\s*Pixel[_ ]size:?\s*" + _FLOAT + r"\s*m\s*x\s*" + _FLOAT + r"\s*m", re.M),
    "beam_xy": re.compile(r"^#\s*Beam_xy:?\s*\(\s*" + _FLOAT + r"\s*,\s*" + _FLOAT + r"\s*\)", re.M),
    "date": re.compile(r"^#\s*(\d{4}-\d{2}-\d{2}T[\d:.]+)\s*$", re.M),
}


class CbfError(ValueError):
    """A file that cannot be used as a frame; the message says why."""


class NotACbfError(CbfError):
    """Not a CBF file at all (garbage in the landing directory)."""


class IncompleteCbfError(CbfError):
    """The binary section is shorter than announced: still being written, or truncated."""


class CorruptCbfError(CbfError):
    """Complete but inconsistent (bad MD5, unsupported encoding, wrong element count)."""


@dataclass(frozen=True)
class CbfHeader:
    """What the header announces about the frame and the acquisition."""

    binary_offset: int  # first byte of the compressed stream in the file
    binary_size: int  # X-Binary-Size
    n_elements: int
    shape: tuple[int, int]  # (rows, columns) = (second, fastest dimension)
    padding: int = 0
    md5: str | None = None
    element_type: str = "signed 32-bit integer"
    conversions: str = "x-CBF_BYTE_OFFSET"
    text: bytes = b""  # the header text before the binary section (parsed on demand)

    @functools.cached_property
    def pilatus(self) -> dict:
        """Acquisition metadata of the Pilatus header (exposure, wavelength, distance...)."""
        try:
            return _parse_pilatus(self.text.decode("ascii", errors="replace"))
        except ValueError:  # a malformed number in free text is not worth losing a frame over
            return {}

    @property
    def required_size(self) -> int:
        """Bytes the file must hold for the compressed stream to be whole."""
        return self.binary_offset + self.binary_size


def _parse_pilatus(text: str) -> dict:
    out: dict = {}
    for key, pattern in _PILATUS_PATTERNS.items():
        match = pattern.search(text)
        if not match:
            continue
        groups = match.groups()
        if key in ("detector", "date"):
            out[key] = groups[0]
        elif len(groups) == 1:
            out[key] = float(groups[0])
        else:
            out[key] = tuple(float(g) for g in groups)
    return out


_MIME_START = b"--CIF-BINARY-FORMAT-SECTION--"
_MIME_NAMES = (b"X-Binary-Size", b"X-Binary-Number-of-Elements", b"X-Binary-Size-Fastest-Dimension",
               b"X-Binary-Size-Second-Dimension", b"X-Binary-Size-Padding", b"X-Binary-Element-Type",
               b"X-Binary-Element-Byte-Order", b"Content-MD5")


def _mime_fields(text: bytes) -> dict[str, bytes]:
    """The MIME fields of the binary section, found with plain searches (this runs for every frame)."""
    out: dict[str, bytes] = {}
    for name in _MIME_NAMES:
        start = 0
        while True:
            i = text.find(name, start)
            if i < 0:
                break
            j = i + len(name)
            # the name must be followed by optional blanks and a colon (X-Binary-Size vs X-Binary-Size-Padding)
            k = j
            while k < len(text) and text[k] in b" \t":
                k += 1
            if k < len(text) and text[k] == 58 and (i == 0 or text[i - 1] in b"\r\n"):
                end = text.find(b"\n", k)
                out[name.decode()] = text[k + 1: len(text) if end < 0 else end].strip()
                break
            start = j
    return out


def parse_header(head: bytes | bytearray) -> CbfHeader:
    """Parse the part of a CBF file up to and including the binary marker.

    ``head`` may contain more bytes (the whole file); only the text before the
    marker is read, and nothing is copied.  Raises :class:`NotACbfError` for
    anything that is not a byte-offset CBF and :class:`IncompleteCbfError`
    when the marker or the MIME header has not been written yet.
    """
    if not head.startswith(CBF_MAGIC):
        if len(head) < len(CBF_MAGIC) and CBF_MAGIC.startswith(bytes(head)):
            raise IncompleteCbfError("file is empty or shorter than the CBF magic")
        raise NotACbfError("does not start with ###CBF")
    marker = head.find(BINARY_MARKER, 0, MAX_HEADER_BYTES)
    if marker < 0:
        if len(head) < MAX_HEADER_BYTES:
            raise IncompleteCbfError("binary section marker not written yet")
        raise NotACbfError("no binary section marker in the first 64 KiB")
    text = bytes(head[:marker])
    mime_start = text.rfind(_MIME_START)
    mime_text = text[mime_start:] if mime_start >= 0 else text
    mime = _mime_fields(mime_text)
    values: dict[str, int] = {}
    for key, name in _MIME_KEYS.items():
        raw = mime.get(key.decode())
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError as exc:
            raise CorruptCbfError(f"{key.decode()} is not an integer: {raw!r}") from exc
    for name in ("binary_size", "dim_fast", "dim_slow"):
        if name not in values:
            raise CorruptCbfError(f"MIME header lacks {name}")
    conv = _CONVERSIONS_RE.search(mime_text)
    conversions = conv.group(1).decode() if conv else "unknown"
    if conversions != "x-CBF_BYTE_OFFSET":
        raise CorruptCbfError(f"unsupported compression {conversions!r} (only x-CBF_BYTE_OFFSET)")
    etype = mime.get("X-Binary-Element-Type", b'"signed 32-bit integer"').strip(b'"').decode("ascii", "replace")
    if etype not in ("signed 32-bit integer", "unsigned 32-bit integer", "signed 16-bit integer"):
        raise CorruptCbfError(f"unsupported element type {etype!r}")
    order = mime.get("X-Binary-Element-Byte-Order", b"LITTLE_ENDIAN").decode("ascii", "replace")
    if order != "LITTLE_ENDIAN":
        raise CorruptCbfError(f"unsupported byte order {order!r}")
    shape = (values["dim_slow"], values["dim_fast"])
    n_elements = values.get("n_elements", shape[0] * shape[1])
    if shape[0] <= 0 or shape[1] <= 0 or n_elements != shape[0] * shape[1]:
        raise CorruptCbfError(f"element count {n_elements} does not match dimensions {shape}")
    if values["binary_size"] <= 0:
        raise CorruptCbfError("X-Binary-Size must be positive")
    md5 = mime.get("Content-MD5")
    return CbfHeader(
        binary_offset=marker + len(BINARY_MARKER),
        binary_size=values["binary_size"],
        n_elements=n_elements,
        shape=shape,
        padding=values.get("padding", 0),
        md5=md5.decode("ascii", "replace") if md5 else None,
        element_type=etype,
        conversions=conversions,
        text=text,
    )


@dataclass
class CbfFrame:
    """A parsed frame: header plus the compressed stream (not decoded)."""

    header: CbfHeader
    raw: memoryview  # exactly header.binary_size bytes
    release: object = None  # called once the bytes are no longer needed (pinned staging memory)
    pinned: bool = False  # the bytes sit in page-locked memory the device can copy from directly
    arena_offset: int | None = None  # where the stream starts in the OpenCL engine's staging arena

    @property
    def shape(self) -> tuple[int, int]:
        return self.header.shape

    def check_md5(self) -> None:
        """Raise :class:`CorruptCbfError` when Content-MD5 does not match."""
        if self.header.md5 is None:
            return
        digest = base64.b64encode(hashlib.md5(self.raw).digest()).decode()
        if digest != self.header.md5:
            raise CorruptCbfError(f"Content-MD5 mismatch: header {self.header.md5}, data {digest}")


def parse_frame(buffer: bytes | bytearray | memoryview, check_md5: bool = False) -> CbfFrame:
    """Split a whole CBF file held in memory into header and compressed stream."""
    view = memoryview(buffer).cast("B")
    if isinstance(buffer, (bytes, bytearray)):
        header = parse_header(buffer)
    else:  # copy only the header: a Pilatus header fits in a few KiB, the 64 KiB limit is for odd files
        head = bytes(view[:HEADER_PROBE])
        if head.find(BINARY_MARKER) < 0 and len(view) > HEADER_PROBE:
            head = bytes(view[:MAX_HEADER_BYTES])
        header = parse_header(head)
    if len(view) < header.required_size:
        raise IncompleteCbfError(
            f"binary section has {max(0, len(view) - header.binary_offset)} of {header.binary_size} bytes"
        )
    frame = CbfFrame(header, view[header.binary_offset : header.required_size])
    if check_md5:
        frame.check_md5()
    return frame


def read_frame(path: str | os.PathLike, check_md5: bool = False) -> CbfFrame:
    """Read and split a CBF file (one read, no decoding)."""
    with open(path, "rb", opener=_open_no_follow) as handle:
        data = handle.read()
    return parse_frame(data, check_md5=check_md5)


def _open_no_follow(path, flags: int) -> int:
    """Frames are read from regular files only: a symbolic link put in their place fails (ELOOP)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def read_header(path: str | os.PathLike) -> CbfHeader:
    """The header of a CBF file, reading only the header.  Raises :class:`IncompleteCbfError` while the
    header itself is not all written, another :class:`CbfError` for a file that is no CBF, OSError when
    it cannot be read."""
    with open(path, "rb", opener=_open_no_follow) as handle:
        head = handle.read(HEADER_PROBE)
        if head.find(BINARY_MARKER) < 0 and len(head) == HEADER_PROBE:  # a long header
            head += handle.read(MAX_HEADER_BYTES - HEADER_PROBE)
    return parse_header(head)


def is_complete(path: str | os.PathLike) -> bool:
    """True when the file holds its whole binary section.  Cheap: reads the header only."""
    try:
        return os.stat(path).st_size >= read_header(path).required_size
    except (IncompleteCbfError, FileNotFoundError):
        return False


def element_dtype(header: CbfHeader) -> np.dtype:
    """numpy dtype of the decoded elements."""
    return np.dtype({"signed 32-bit integer": "<i4", "unsigned 32-bit integer": "<u4",
                     "signed 16-bit integer": "<i2"}[header.element_type])
