"""PNG previews of a NeXus result (sinogram of a chosen bin range), for the demo and for people."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def strongest_bins(patterns: np.ndarray, n: int = 3, width: int = 3, candidates: int = 12) -> list[tuple[int, int]]:
    """Bin ranges of ``n`` peaks whose sinograms differ most (one per phase, when the phases differ in space).

    ``patterns`` is [rotation, translation, bin] (or [frame, bin]).  Candidates are the peaks of the
    95th-percentile pattern (a phase present in a small inclusion is weak in the mean but strong where the
    beam crosses it); maps that are mostly noise are dropped; then peaks are taken greedily, each the least
    correlated in space with those already taken.
    """
    flat = np.nan_to_num(patterns.reshape(-1, patterns.shape[-1]))
    high = np.percentile(flat, 95, axis=0)
    window = max(1, min(51, high.size) // 2 * 2 - 1)  # odd, no longer than the pattern
    excess = high - np.convolve(high, np.ones(window) / window, mode="same")
    peaks: list[int] = []
    for idx in np.argsort(excess)[::-1]:
        if all(abs(idx - p) > 4 * width for p in peaks):
            peaks.append(int(idx))
        if len(peaks) == candidates:
            break
    maps, quality = {}, {}
    for p in peaks:
        a, b = max(0, p - width), min(flat.shape[1], p + width + 1)
        m = flat[:, a:b].mean(axis=1)
        maps[p] = (m - m.mean()) / (m.std() + 1e-12)
        if patterns.ndim == 3:  # structure, not noise: the map correlates with its own 3x3 smoothing
            img = maps[p].reshape(patterns.shape[:2])
            pad = np.pad(img, 1, mode="edge")
            smooth = sum(pad[i:i + img.shape[0], j:j + img.shape[1]] for i in range(3) for j in range(3)) / 9
            quality[p] = float(np.corrcoef(img.ravel(), smooth.ravel())[0, 1])
    good = [p for p in peaks if quality.get(p, 1.0) > 0.6] or peaks[:1]
    chosen = good[:1]
    while len(chosen) < min(n, len(good)):
        rest = [p for p in good if p not in chosen]
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


def save_demo_pictures(nexus_file: str | Path, directory: str | Path) -> dict[str, Path]:
    """The demo's pictures: the sinogram (three peaks as RGB) and the tomograms of three phases beside
    their sinograms (the tomograms are also written into the NeXus file)."""
    from .tomo import save_nexus_tomogram_png, write_tomograms

    directory = Path(directory)
    out = {"sinogram": save_sinogram_png(nexus_file, directory / "sinogram.png")}
    with h5py.File(nexus_file, "r", swmr=True) as f:
        ranges = strongest_bins(f["entry/sinogram/intensity"][()])  # peaks that differ in space: phases
    write_tomograms(nexus_file, bins=ranges)
    out["tomogram"] = save_nexus_tomogram_png(nexus_file, directory / "tomogram.png")
    return out


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
