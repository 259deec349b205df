"""PNG previews of a NeXus result (sinogram of a chosen bin range), for the demo and for people."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def strongest_bins(patterns: np.ndarray, n: int = 3, width: int = 3, candidates: int = 8) -> list[tuple[int, int]]:
    """Bin ranges of ``n`` peaks whose sinograms differ most (one per phase, when the phases differ in space).

    ``patterns`` is [..., bin].  The strongest ``candidates`` peaks of the mean pattern are ranked, then
    peaks are taken greedily, each the least correlated (in space) with those already taken.
    """
    flat = np.nan_to_num(patterns.reshape(-1, patterns.shape[-1]))
    mean = flat.mean(axis=0)
    base = np.convolve(mean, np.ones(51) / 51, mode="same")
    excess = mean - base
    peaks: list[int] = []
    for idx in np.argsort(excess)[::-1]:
        if all(abs(idx - p) > 4 * width for p in peaks):
            peaks.append(int(idx))
        if len(peaks) == candidates:
            break
    maps = {}
    for p in peaks:
        a, b = max(0, p - width), min(flat.shape[1], p + width + 1)
        m = flat[:, a:b].mean(axis=1)
        maps[p] = (m - m.mean()) / (m.std() + 1e-12)
    chosen = peaks[:1]
    while len(chosen) < min(n, len(peaks)):
        rest = [p for p in peaks if p not in chosen]
        chosen.append(min(rest, key=lambda p: max(abs(float(np.mean(maps[p] * maps[c]))) for c in chosen)))
    return [(max(0, p - width), min(flat.shape[1], p + width + 1)) for p in chosen]


def save_sinogram_png(nexus_file: str | Path, png: str | Path) -> Path:
    """Sinograms of the three strongest peaks as the RGB channels of one picture."""
    with h5py.File(nexus_file, "r", swmr=True) as f:
        sino = f["entry/sinogram/intensity"][()]
    ranges = strongest_bins(sino)
    channels = []
    for a, b in ranges:
        img = np.nanmean(sino[:, :, a:b], axis=2)
        lo, hi = np.nanpercentile(img, 1), np.nanpercentile(img, 99.5)
        channels.append(np.clip((np.nan_to_num(img, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1))
    while len(channels) < 3:
        channels.append(np.zeros_like(channels[0]))
    rgb = (np.stack(channels, axis=-1) * 255).astype(np.uint8)
    scale = max(1, 320 // max(rgb.shape[:2]))
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    write_png(png, rgb)
    return Path(png)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Minimal PNG writer (8-bit RGB or grey), so previews need no imaging library."""
    import struct
    import zlib

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim == 2:
        color, data = 0, rgb
    else:
        color, data = 2, rgb.reshape(rgb.shape[0], -1)
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + row.tobytes() for row in data)

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)
