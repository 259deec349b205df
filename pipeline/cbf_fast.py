"""Headers of a run of frames checked against the first one, without the GIL.

A detector writes the same MIME block for every frame of a scan but for two values: X-Binary-Size and
Content-MD5.  :func:`pipeline.cbf.parse_header` parses the first frame of a run in full; for the
others a compiled function checks that the MIME block is byte for byte that of the first (outside
those two values, which must look like a number and a base64 digest) and reads the two values.  A
frame that matches has, by construction, the header ``parse_header`` would return; any other frame
(another layout, a truncated file, garbage) is left to ``parse_header``, which names the problem.
At thousands of frames a second this takes ~20 µs of Python per frame off the shared interpreter.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .cbf import _CONVERSIONS_RE, _MIME_START, BINARY_MARKER, CBF_MAGIC, MAX_HEADER_BYTES, CbfFrame, CbfHeader

_MAGIC = np.frombuffer(CBF_MAGIC, np.uint8)
_VALUE = {b"X-Binary-Size": 1, b"Content-MD5": 2}  # kind of value: 1 digits, 2 base64
_LINE_RE = re.compile(rb"(?m)^(X-Binary-Size|Content-MD5)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$")

try:
    from numba import njit

    @njit(nogil=True, cache=False)
    def _match(region, offsets, got, magic, tmpl, spans, kinds, start_len, marker_out, size_out, md5_out, ok):
        """ok[k] = 1 when file k starts with the CBF magic and its MIME block equals the template outside
        the value spans."""
        n_spans = spans.shape[0]
        for k in range(offsets.shape[0]):
            ok[k] = 0
            if got[k] < magic.shape[0] + 4:
                continue
            base = offsets[k]
            same_magic = True
            for q in range(magic.shape[0]):
                if region[base + q] != magic[q]:
                    same_magic = False
            if not same_magic:
                continue
            limit = min(got[k], 65536)
            m = -1
            for p in range(limit - 3):
                if (region[base + p] == 0x0C and region[base + p + 1] == 0x1A and region[base + p + 2] == 0x04
                        and region[base + p + 3] == 0xD5):
                    m = p
                    break
            if m < 0:
                continue
            # the last MIME start before the marker (parse_header uses rfind)
            s = -1
            p = m - start_len
            while p >= 0:
                same = True
                for q in range(start_len):
                    if region[base + p + q] != tmpl[q]:
                        same = False
                        break
                if same:
                    s = p
                    break
                p -= 1
            if s < 0:
                continue
            i = 0
            j = s
            good = True
            size = 0
            for v in range(n_spans + 1):
                end = spans[v, 0] if v < n_spans else tmpl.shape[0]
                while i < end:  # fixed bytes
                    if j >= m or region[base + j] != tmpl[i]:
                        good = False
                        break
                    i += 1
                    j += 1
                if not good or v == n_spans:
                    break
                begin = j  # a value: up to the end of the line, blanks trimmed at the end
                while j < m and region[base + j] != 13 and region[base + j] != 10:
                    j += 1
                stop = j
                while stop > begin and (region[base + stop - 1] == 32 or region[base + stop - 1] == 9):
                    stop -= 1
                if stop == begin:
                    good = False
                    break
                for q in range(begin, stop):
                    c = region[base + q]
                    if kinds[v] == 1:
                        if c < 48 or c > 57:
                            good = False
                            break
                        size = size * 10 + (c - 48)
                        if size > 4_000_000_000:
                            good = False
                            break
                    elif not ((48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 43 or c == 47
                              or c == 61):
                        good = False
                        break
                if not good:
                    break
                if kinds[v] == 2:
                    md5_out[k, 0] = begin
                    md5_out[k, 1] = stop
                # the template's trailing blanks of the value line are part of the next fixed segment
                j = stop
                i = spans[v, 1]
            if not good or j != m or size <= 0:
                continue
            marker_out[k] = m
            size_out[k] = size
            ok[k] = 1

    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a dependency; without it every header is parsed in Python
    AVAILABLE = False


class HeaderTemplate:
    """The MIME block of a parsed header with the spans of its per-frame values."""

    def __init__(self, header: CbfHeader):
        self.header = header
        text = header.text
        start = text.rfind(_MIME_START)
        self.usable = False
        if start < 0 or len(text) > MAX_HEADER_BYTES:
            return
        mime = text[start:]
        # line starts as parse_header sees them (after CR or LF): the value spans must be those it reads
        if re.search(rb"\r(?!\n)", mime) or any(len(re.findall(rb"[\r\n]" + re.escape(name) + rb"[ \t]*:", mime)) != 1
                                                for name in _VALUE if name in mime):
            return
        conv = _CONVERSIONS_RE.search(mime)
        spans, kinds = [], []
        for match in _LINE_RE.finditer(mime):
            spans.append((match.start(2), match.end(2)))
            kinds.append(_VALUE[match.group(1)])
        # values must come after the conversions field, so that they cannot change what it reads
        if conv is None or not spans or any(a < conv.end() for a, _ in spans) or kinds.count(1) != 1 \
                or len(kinds) != len(set(kinds)) or (header.md5 is None) == (2 in kinds):
            return
        self.mime = np.frombuffer(mime, np.uint8)
        self.spans = np.array(spans, np.int64).reshape(-1, 2)
        self.kinds = np.array(kinds, np.int64)
        self.usable = AVAILABLE

    def match(self, region: np.ndarray, offsets: np.ndarray, got: np.ndarray):
        """Per file: (matches, marker position, binary size, md5 span) — all in one nogil call."""
        n = offsets.shape[0]
        marker = np.zeros(n, np.int64)
        size = np.zeros(n, np.int64)
        md5 = np.zeros((n, 2), np.int64)
        ok = np.zeros(n, np.uint8)
        if self.usable and n:
            _match(region, offsets, got, _MAGIC, self.mime, self.spans, self.kinds, len(_MIME_START), marker, size,
                   md5, ok)
        return ok, marker, size, md5

    def header_for(self, text: bytes, marker: int, size: int, md5: bytes | None) -> CbfHeader:
        """The header of a frame that matched: the template's, with this frame's offset, size, digest, text."""
        return dataclasses.replace(self.header, binary_offset=marker + len(BINARY_MARKER), binary_size=size,
                                   md5=md5.decode("ascii") if md5 is not None else None, text=text)


def frames_from_run(template: HeaderTemplate | None, region: np.ndarray, offsets: np.ndarray, got: np.ndarray,
                    check_md5: bool = False) -> list[CbfFrame | None]:
    """Frames of a run read into ``region`` whose headers match ``template``; None where the full parser
    must look (no template, another layout, too short, not a CBF)."""
    out: list[CbfFrame | None] = [None] * len(offsets)
    if template is None or not template.usable:
        return out
    ok, marker, size, md5 = template.match(region, offsets, got)
    for k in np.flatnonzero(ok):
        base, m, n = int(offsets[k]), int(marker[k]), int(size[k])
        start = base + m + len(BINARY_MARKER)
        if start + n > base + got[k]:  # incomplete: parse_header's caller says how
            continue
        digest = region[base + md5[k, 0]:base + md5[k, 1]].tobytes() if md5[k, 1] > md5[k, 0] else None
        header = template.header_for(region[base:base + m].tobytes(), m, n, digest)
        frame = CbfFrame(header, memoryview(region[start:start + n]))
        if check_md5:
            frame.check_md5()  # CorruptCbfError: the caller records it for this frame
        out[k] = frame
    return out


def warm_up() -> None:
    """Compile the readers' compiled functions (a second or two, once per process) before frames wait on them."""
    from .fastio import read_packed

    region = np.zeros(4096, np.uint8)
    read_packed([], region)
    if AVAILABLE:
        empty = np.zeros(0, np.int64)
        _match(region, empty, empty, _MAGIC, _MAGIC, np.zeros((1, 2), np.int64), np.ones(1, np.int64),
               len(_MIME_START), empty, empty, np.zeros((0, 2), np.int64), np.zeros(0, np.uint8))
