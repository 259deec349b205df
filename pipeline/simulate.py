"""A synthetic XRD-CT scan: a phantom of several phases seen by a Pilatus3 2M CdTe.

The sample is a disc of one phase holding inclusions of two others.  For each
(rotation, translation) the pencil beam crosses an amount of each phase (the
Radon transform of its map); the frame is the sum of the phases' powder rings
scaled by those amounts, with solid angle, polarization, Poisson noise, module
gaps (-1) and bad pixels (-2), written as a real CBF by fabio with a Pilatus
header.  A player writes the frames into a landing directory at a given rate,
optionally the way NFS shows them (growing slowly, in pieces).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .scan import ScanModel

WAVELENGTH_M = 0.1771e-10  # 70 keV, as on a high-energy XRD-CT beamline
DISTANCE_M = 0.5
PIXEL_M = 172e-6
DETECTOR = "Pilatus CdTe 2M"


@dataclass(frozen=True)
class Phase:
    name: str
    lattice_a: float  # Angstrom, face-centred cubic
    strength: float


PHASES = (Phase("CeO2", 5.411, 1.0), Phase("Al", 4.0495, 0.8), Phase("Ni", 3.524, 1.2))


def fcc_peaks(a: float, q_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Peak positions (q in nm^-1) and multiplicity-weighted heights of an fcc lattice."""
    peaks: dict[int, int] = {}
    n = int(q_max * a / (2 * np.pi * 10)) + 2
    for h in range(-n, n + 1):
        for k in range(-n, n + 1):
            for l_ in range(-n, n + 1):
                if (h, k, l_) == (0, 0, 0):
                    continue
                if len({h % 2, k % 2, l_ % 2}) != 1:  # fcc: all even or all odd
                    continue
                s = h * h + k * k + l_ * l_
                peaks[s] = peaks.get(s, 0) + 1
    q = np.array([20 * np.pi * np.sqrt(s) / a for s in sorted(peaks)])  # 2pi/d, nm^-1
    height = np.array([peaks[s] for s in sorted(peaks)], dtype=float) / q**2
    keep = q < q_max
    return q[keep], height[keep] / height[keep].max()


def phantom(n: int) -> np.ndarray:
    """Phase fractions [phase, y, x] on an n x n grid: a disc with two inclusions."""
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    maps = np.zeros((len(PHASES), n, n))
    disc = x**2 + y**2 < 0.85**2
    inc1 = (x - 0.3) ** 2 + (y + 0.2) ** 2 < 0.28**2
    inc2 = (np.abs(x + 0.35) < 0.18) & (np.abs(y - 0.3) < 0.25)
    maps[0] = disc & ~inc1 & ~inc2
    maps[1] = inc1 & disc
    maps[2] = inc2 & disc
    return maps


def radon(image: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Line integrals [angle, offset] by rotate-and-sum (enough for a phantom)."""
    from scipy.ndimage import rotate

    return np.stack([rotate(image, -a, reshape=False, order=1).sum(axis=0) for a in angles_deg])


def make_poni_text(shape: tuple[int, int] = (1679, 1475), detector: str = DETECTOR) -> str:
    return (
        "# Nota: PONI file written by xrdct simulate\n"
        "poni_version: 2.1\n"
        f'Detector: {detector}\nDetector_config: {{"orientation": 3}}\n'
        f"Distance: {DISTANCE_M}\nPoni1: {shape[0] / 2 * PIXEL_M + 3e-4:.6f}\n"
        f"Poni2: {shape[1] / 2 * PIXEL_M - 2e-4:.6f}\n"
        "Rot1: 0.0012\nRot2: -0.0008\nRot3: 0.0\n"
        f"Wavelength: {WAVELENGTH_M:.6e}\n"
    )


@dataclass
class SimulatedScan:
    """Frames of a phantom scan, generated on demand and cached as CBF bytes."""

    rotations: int = 8
    translations: int = 10
    seed: int = 0
    counts: float = 300.0  # mean counts of a strong ring pixel
    bad_pixels: int = 200
    first_frame: int = 0
    prefix: str = "frame_"
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        from .geometry import make_integrator

        self.scan = ScanModel(self.rotations, self.translations, first_frame=self.first_frame)
        self.poni_text = make_poni_text()
        ai = self.ai = make_integrator(self.poni_text)
        self.shape = ai.detector.shape
        self.gaps = ai.detector.mask.astype(bool)
        rng = np.random.default_rng(self.seed)
        flat = rng.choice(self.gaps.size, self.bad_pixels, replace=False)
        self.bad = np.zeros(self.gaps.size, dtype=bool)
        self.bad[flat] = True
        self.bad = self.bad.reshape(self.shape) & ~self.gaps
        q = ai.qArray(self.shape)  # nm^-1
        weight = ai.solidAngleArray(self.shape) * ai.polarization(self.shape, 0.99)
        grid = np.linspace(0, float(q.max()) * 1.001, 8192)
        self.phase_images = []
        for phase in PHASES:
            centres, heights = fcc_peaks(phase.lattice_a, grid[-1])
            profile = np.zeros_like(grid)
            for c, h in zip(centres, heights):
                profile += h * np.exp(-0.5 * ((grid - c) / 0.08) ** 2)
            self.phase_images.append((phase.strength * np.interp(q, grid, profile) * weight).astype(np.float32))
        self.background = ((0.05 + 0.3 * np.exp(-q / 30.0)) * weight).astype(np.float32)
        self.angles = np.linspace(0, 180, self.rotations, endpoint=False)
        maps = phantom(self.translations)
        self.phase_maps = maps
        sino = np.stack([radon(m, self.angles) for m in maps])  # [phase, rot, trans]
        self.amounts = sino / max(float(sino.max()), 1e-12)

    @property
    def n_frames(self) -> int:
        return self.rotations * self.translations

    def filename(self, frame: int) -> str:
        return f"{self.prefix}{frame:05d}.cbf"

    def image(self, frame: int) -> np.ndarray:
        """The int32 detector image of a frame (deterministic for a seed)."""
        rot, trans = self.scan.position(frame)
        rng = np.random.default_rng((self.seed, frame))
        mean = self.background.copy()
        for amount, img in zip(self.amounts[:, rot, trans], self.phase_images):
            if amount > 0:
                mean += np.float32(amount) * img
        lam = mean * np.float32(self.counts / float(np.max(self.phase_images[0])))
        data = rng.poisson(lam).astype(np.int32)
        data[self.gaps] = -1
        data[self.bad] = -2
        return data

    def cbf_bytes(self, frame: int) -> bytes:
        """The frame as a Pilatus CBF file, written by fabio."""
        if frame in self._cache:
            return self._cache[frame]
        import fabio.cbfimage

        rot, trans = self.scan.position(frame)
        header_contents = "\r\n".join([
            "# Detector: PILATUS3 2M CdTe, S/N 24-0000 (xrdct simulate)",
            time.strftime("# %Y-%m-%dT%H:%M:%S.000", time.gmtime(1764000000 + frame * 0.004)),
            "# Pixel_size 172e-6 m x 172e-6 m",
            "# Silicon sensor, thickness 0.001000 m",
            "# Exposure_time 0.0039000 s",
            "# Exposure_period 0.0040000 s",
            "# Tau = 0 s",
            "# Count_cutoff 1048574 counts",
            "# Threshold_setting: 35000 eV",
            f"# N_excluded_pixels = {self.bad_pixels}",
            "# Image_path: /data/landing/",
            f"# Wavelength {WAVELENGTH_M * 1e10:.5f} A",
            f"# Detector_distance {DISTANCE_M:.5f} m",
            f"# Beam_xy ({self.shape[1] / 2:.2f}, {self.shape[0] / 2:.2f}) pixels",
            f"# Start_angle {self.angles[rot]:.4f} deg.",
            f"# Translation {trans}",
        ])
        img = fabio.cbfimage.CbfImage(data=self.image(frame), header={"_array_data.header_contents": header_contents})
        with tempfile.NamedTemporaryFile(suffix=".cbf", delete=False) as tmp:
            name = tmp.name
        try:
            img.write(name)
            data = Path(name).read_bytes()
        finally:
            os.unlink(name)
        return data

    def prepare(self, frames=None, cache: bool = True) -> None:
        """Generate frames ahead so that playback can run at detector speed."""
        for frame in frames if frames is not None else self.scan.frames():
            data = self.cbf_bytes(frame)
            if cache:
                self._cache[frame] = data

    def write_support_files(self, directory: str | Path) -> dict[str, Path]:
        """PONI and mask beside the frames (mask = bad pixels; gaps come from the detector)."""
        import fabio.edfimage

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        poni = directory / "geometry.poni"
        poni.write_text(self.poni_text)
        mask = directory / "mask.edf"
        fabio.edfimage.EdfImage(data=self.bad.astype(np.uint8)).write(str(mask))
        return {"poni": poni, "mask": mask}


def write_frame(path: Path, data: bytes, partial: bool = False, pieces: int = 4, delay: float = 0.0) -> None:
    """Write one file; ``partial`` writes it in pieces with pauses, as NFS readers see it."""
    if not partial:
        with open(path, "wb") as handle:
            handle.write(data)
        return
    step = -(-len(data) // pieces)
    with open(path, "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(delay)


class Player(threading.Thread):
    """Writes a simulated scan into a landing directory at a fixed frame rate."""

    def __init__(self, sim: SimulatedScan, directory: str | Path, rate: float = 250.0,
                 frames=None, partial: bool = False, skip=(), stop_event: threading.Event | None = None):
        super().__init__(daemon=True, name="xrdct-player")
        self.sim = sim
        self.directory = Path(directory)
        self.rate = rate
        self.frames = list(frames if frames is not None else sim.scan.frames())
        self.partial = partial
        self.skip = set(skip)
        self.stop_event = stop_event or threading.Event()
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            for i, frame in enumerate(self.frames):
                if self.stop_event.is_set():
                    break
                if self.rate > 0:
                    wait = t0 + i / self.rate - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                if frame in self.skip:
                    continue
                path = self.directory / self.sim.filename(frame)
                write_frame(path, self.sim.cbf_bytes(frame), partial=self.partial,
                            delay=0.5 / self.rate if self.rate > 0 else 0.0)
                self.written += 1
        except BaseException as exc:  # reported to whoever joins
            self.error = exc
