"""Filtered back-projection (pipeline.tomo): against the phantom's truth, scikit-image, OpenCL, NeXus and PNG.

Most tests take the simulated phantom's phase maps and their Radon transform directly (fast);
``test_end_to_end_simulated_scan`` goes once through detector frames, pyFAI integration and the
NeXus writer.  Accuracy numbers are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import struct
import zlib

import h5py
import numpy as np
import pytest
from scipy.ndimage import shift as nd_shift

from pipeline import tomo
from pipeline.simulate import PHASES, phantom, radon

N = 101  # odd: scikit-image's rotation centre N // 2 is then the same as ours, (N - 1) / 2
ANGLES = tomo.default_angles(180, 180.0)
SKIMAGE_FILTERS = {"ram-lak": "ramp", "shepp-logan": "shepp-logan", "cosine": "cosine", "hamming": "hamming",
                   "hann": "hann"}


# -- shared helpers ----------------------------------------------------------------------------------------


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def inside(n: int, fraction: float = 0.95) -> np.ndarray:
    c = (n - 1) / 2
    y, x = np.mgrid[:n, :n] - c
    return x**2 + y**2 <= (fraction * c) ** 2


def scores(image: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Pearson correlation, RMS error / RMS truth) over the whole grid."""
    corr = float(np.corrcoef(image.ravel(), truth.ravel())[0, 1])
    nrmse = float(np.sqrt(np.mean((image - truth) ** 2)) / np.sqrt(np.mean(truth**2)))
    return corr, nrmse


def read_png(path) -> tuple[int, int, int]:
    """(width, height, colour type) of a PNG, after checking its chunks' CRCs and that the image data inflates."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + payload)
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif tag == b"IDAT":
            idat += payload
        pos += 12 + length
    width, height, _, colour = header[:4]
    assert len(zlib.decompress(idat)) == height * (1 + width * (3 if colour == 2 else 1))
    return width, height, colour


@pytest.fixture(scope="module")
def maps() -> np.ndarray:
    return phantom(N)


@pytest.fixture(scope="module")
def sinos(maps) -> np.ndarray:
    """[phase, angle, translation] line integrals of the phase maps (simulate.radon's convention)."""
    return np.stack([radon(m, ANGLES) for m in maps])


def have_opencl() -> bool:
    return tomo.opencl_backprojector() is not None


# -- against the truth and against scikit-image ------------------------------------------------------------


@pytest.mark.parametrize("filter_name", tomo.FILTERS)
def test_reconstruction_matches_phase_maps_and_iradon(maps, sinos, filter_name):
    skimage_transform = pytest.importorskip("skimage.transform")
    rec = tomo.reconstruct(sinos, ANGLES, filter_name=filter_name, engine="cpu", pad="constant", circle=True)
    assert rec.images.shape == (3, N, N) and rec.images.dtype == np.float32
    assert rec.center == (N - 1) / 2 and rec.n_used == len(ANGLES)
    mask = inside(N)
    for p, phase in enumerate(PHASES):
        corr, nrmse = scores(rec.images[p], maps[p])
        # circle=False with output_size=N: circle=True would first pad the sinogram to the diagonal (a longer
        # filter, so windowed filters differ slightly); the comparison is made inside the circle anyway
        ref = skimage_transform.iradon(sinos[p].T, ANGLES, filter_name=SKIMAGE_FILTERS[filter_name], circle=False,
                                       output_size=N)
        diff = float(np.abs(rec.images[p] - ref)[mask].max() / np.abs(ref).max())
        corr_ref = float(np.corrcoef(rec.images[p][mask], ref[mask])[0, 1])
        print(f"{filter_name:12s} {phase.name:5s} vs truth: r={corr:.4f} nrmse={nrmse:.3f}; "
              f"vs iradon: max|diff|/max={diff:.2e} r={corr_ref:.8f}")
        assert corr > 0.98 and nrmse < 0.2  # a binary phantom: smoothing windows blur its edges
        assert diff < 1e-4 and corr_ref > 0.999999


def test_edge_padding_and_even_size(maps):
    """Default options (edge padding, no circle) on an even grid, with a constant air-scatter offset."""
    n = 80
    truth = phantom(n)
    sino = np.stack([radon(m, ANGLES) for m in truth]) + 5.0  # offset: ignored thanks to the edge padding
    images = tomo.fbp(sino, ANGLES, engine="cpu")
    for p in range(3):
        corr, nrmse = scores(images[p], truth[p])
        print(f"N={n} {PHASES[p].name}: r={corr:.4f} nrmse={nrmse:.3f}")
        assert corr > 0.97 and nrmse < 0.2
    single = tomo.fbp(sino[1], ANGLES, engine="cpu")  # 2D in, 2D out
    assert single.shape == (n, n)
    np.testing.assert_allclose(single, images[1], atol=1e-5 * np.abs(images[1]).max())


def test_360_degree_scan_equals_180(maps):
    angles = tomo.default_angles(360, 360.0)
    sino = np.stack([radon(m, angles) for m in maps[:2]])
    full = tomo.fbp(sino, angles, angular_range=360.0, engine="cpu")
    half = tomo.fbp(sino[:, :180], angles[:180], engine="cpu")
    weights = tomo.angle_weights(angles, angular_range=360.0)
    np.testing.assert_allclose(weights, np.pi / 360)
    for p in range(2):
        corr, _ = scores(full[p], maps[p])
        assert corr > 0.98
        assert np.corrcoef(full[p].ravel(), half[p].ravel())[0, 1] > 0.995


# -- centre of rotation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [2.3, -3.7])
def test_center_estimation_recovers_a_known_shift(maps, sinos, shift):
    rng = np.random.default_rng(7)
    shifted = nd_shift(sinos, (0, 0, shift), order=1) + 2.0  # axis moved by `shift`, constant background
    shifted += rng.normal(0, 0.01 * sinos.max(), shifted.shape)  # 1 % noise
    true_center = (N - 1) / 2 + shift
    for method in ("centroid", "auto"):
        found = tomo.estimate_center(shifted, ANGLES, method=method)
        print(f"shift {shift:+.2f}: {method} error {found - true_center:+.4f} steps")
        assert abs(found - true_center) < 0.1
    # a partial sinogram (the first 120 degrees) still gives the centre
    partial = shifted.copy()
    partial[:, 120:] = np.nan
    found = tomo.estimate_center(partial, ANGLES, method="centroid")
    assert abs(found - true_center) < 0.15
    # reconstructing with the estimate puts the sample back in place; the geometric centre does not
    good = tomo.fbp(shifted, ANGLES, center="auto", engine="cpu")
    bad = tomo.fbp(shifted, ANGLES, engine="cpu")
    for p in range(3):
        assert scores(good[p], maps[p])[0] > 0.97
        assert scores(bad[p], maps[p])[0] < scores(good[p], maps[p])[0] - 0.02


def test_center_from_opposite_projections_and_sharpness(maps):
    angles = tomo.default_angles(120, 360.0)
    sino = np.stack([radon(m, angles) for m in maps[:2]])
    shifted = nd_shift(sino, (0, 0, 1.6), order=1)
    true_center = (N - 1) / 2 + 1.6
    found = tomo.estimate_center(shifted, angles, method="opposite", angular_range=360.0)
    assert abs(found - true_center) < 0.1
    assert abs(tomo.estimate_center(shifted, angles, angular_range=360.0) - found) < 1e-9  # auto picks opposite
    sharp = tomo.estimate_center(shifted, angles, method="sharpness", angular_range=360.0)
    print(f"opposite error {found - true_center:+.4f}, sharpness error {sharp - true_center:+.4f}")
    assert abs(sharp - true_center) < 0.6  # coarse: a fallback, never picked by "auto"


# -- partial sinograms (live) -------------------------------------------------------------------------------


def test_angle_weights():
    np.testing.assert_allclose(tomo.angle_weights(ANGLES), np.pi / 180)
    used = np.zeros(180, bool)
    used[:60] = True  # a contiguous third: each used row gets pi / 60, the wedge is not dumped on its edges
    w = tomo.angle_weights(ANGLES, used)
    np.testing.assert_allclose(w[:60], np.pi / 60)
    assert not w[60:].any()
    used = np.ones(180, bool)
    used[50] = False  # one row missing in the middle: its neighbours cover it
    w = tomo.angle_weights(ANGLES, used)
    assert w[50] == 0 and w[49] == w[51] == pytest.approx(1.5 * w[10]) and w.sum() == pytest.approx(np.pi)
    assert tomo.angle_weights(ANGLES, np.zeros(180, bool)).sum() == 0


def test_partial_sinograms(maps, sinos):
    full = tomo.fbp(sinos, ANGLES, engine="cpu")
    results = {}
    cases = {"every 3rd rotation": np.arange(180) % 3 == 0, "first 135 degrees": np.arange(180) < 135,
             "first 90 degrees": np.arange(180) < 90}
    for label, measured in cases.items():
        sino = np.where(measured[None, :, None], sinos, np.nan)
        rec = tomo.reconstruct(sino, ANGLES, engine="cpu")
        assert rec.n_used == measured.sum()
        results[label] = [scores(rec.images[p], maps[p])[0] for p in range(3)]
        print(f"{label}: r = {', '.join(f'{r:.3f}' for r in results[label])}")
    assert min(results["every 3rd rotation"]) > 0.95
    assert min(results["first 135 degrees"]) > 0.85  # limited angle: streaks along the missing wedge
    assert min(results["first 90 degrees"]) > 0.65
    # the row being measured (half its translations) is left out; isolated failed frames are interpolated
    sino = sinos.copy()
    sino[:, 101:] = np.nan
    sino[:, 100, 50:] = np.nan
    failed = [(10, 30), (40, 60), (70, 45)]
    for a, t in failed:
        sino[:, a, t] = np.nan
    rec = tomo.reconstruct(sino, ANGLES, engine="cpu")
    assert rec.n_used == 100 and rec.rows_used[:100].all() and not rec.rows_used[100:].any()
    reference = tomo.fbp(np.where((np.arange(180) < 100)[None, :, None], sinos, np.nan), ANGLES, engine="cpu")
    for p in range(3):
        assert np.corrcoef(rec.images[p].ravel(), reference[p].ravel())[0, 1] > 0.999
    # nothing measured yet: zeros, no error
    empty = tomo.reconstruct(np.full_like(sinos, np.nan), ANGLES, engine="cpu")
    assert empty.n_used == 0 and not empty.images.any()
    assert np.isfinite(full).all()


# -- OpenCL ---------------------------------------------------------------------------------------------------


@pytest.mark.opencl
@pytest.mark.parametrize("circle", [False, True])
def test_opencl_agrees_with_cpu(sinos, circle):
    if not have_opencl():
        pytest.skip("no OpenCL device")
    stack = np.concatenate([sinos, sinos[:1] * 3.0]).astype(np.float32)
    stack[:, 150:] = np.nan  # partial, off-centre axis, output grid larger than the translations
    stack[:, 149, 70:] = np.nan
    for kwargs in (dict(), dict(center=52.3, size=N + 16, filter_name="hann")):
        cpu = tomo.reconstruct(stack, ANGLES, engine="cpu", circle=circle, **kwargs)
        gpu = tomo.reconstruct(stack, ANGLES, engine="opencl", circle=circle, **kwargs)
        assert gpu.engine.startswith("opencl") and cpu.engine == "cpu"
        scale = float(np.abs(cpu.images).max())
        err = float(np.abs(gpu.images - cpu.images).max()) / scale
        print(f"OpenCL ({gpu.engine}) vs CPU, circle={circle} {kwargs}: max|diff|/max = {err:.2e}")
        np.testing.assert_allclose(gpu.images, cpu.images, rtol=0, atol=2e-5 * scale)


# -- channels -----------------------------------------------------------------------------------------------


def test_channel_helpers():
    q = np.linspace(10, 50, 400)
    profiles = np.stack([np.exp(-0.5 * ((q - c) / 0.15) ** 2) for c in (20.0, 27.0, 36.0)])
    amounts = np.random.default_rng(1).random((50, 3)) * [1.0, 0.5, 2.0]
    patterns = amounts @ profiles + 0.2 + 0.001 * q
    ranges = tomo.peak_bins(patterns, n=3, width=2)
    centres = [q[(a + b - 1) // 2] for a, b in ranges]
    assert [round(c) for c in centres] == [36, 20, 27]  # by strength: mean amounts 1.0, 0.5, 2.0 x 0.5
    assert all(b - a == 5 for a, b in ranges)
    bins = tomo.radial_to_bins(q, [(19.8, 20.2), (27.0, 27.0)])
    assert all(19.8 <= v <= 20.2 for v in q[bins[0][0]:bins[0][1]])
    assert bins[1][1] - bins[1][0] == 1 and abs(q[bins[1][0]] - 27.0) < 0.06
    with pytest.raises(ValueError):
        tomo.radial_to_bins(q, [(60, 70)])
    cube = np.full((4, 5, q.size), np.nan, np.float32)
    cube[:2] = patterns[:10].reshape(2, 5, -1)
    sino = tomo.channel_sinograms(cube, bins)
    assert sino.shape == (2, 4, 5) and np.isnan(sino[:, 2:]).all() and np.isfinite(sino[:, :2]).all()
    np.testing.assert_allclose(sino[0, 1, 3], cube[1, 3, bins[0][0]:bins[0][1]].mean(), rtol=1e-6)


# -- NeXus and PNG ------------------------------------------------------------------------------------------


def write_synthetic_nexus(path, n_rot: int, n_trans: int, measured_rotations: int):
    """A NeXus file of the pipeline's writer whose patterns are three peaks weighted by the phantom's amounts."""
    from pipeline.nexus import STATUS_OK, NexusWriter
    from pipeline.results import FrameResult
    from pipeline.scan import ScanModel

    q = np.linspace(10, 50, 300)
    centres = (20.1, 26.9, 35.7)
    profiles = np.stack([np.exp(-0.5 * ((q - c) / 0.12) ** 2) for c in centres])
    angles = tomo.default_angles(n_rot)
    truth = phantom(n_trans)
    amounts = np.stack([radon(m, angles) for m in truth])  # [phase, rot, trans]
    scan = ScanModel(n_rot, n_trans)
    writer = NexusWriter(path, q, "q_nm^-1", scan, json.dumps({}), "", "cpu")
    try:
        for frame in range(measured_rotations * n_trans):
            rot, trans = scan.position(frame)
            pattern = (amounts[:, rot, trans] @ profiles + 0.5).astype(np.float32)
            writer.add(frame, frame, FrameResult(pattern, None, np.ones_like(pattern)), STATUS_OK)
    finally:
        writer.close()
    return q, centres, truth


def test_write_tomograms_to_nexus(tmp_path):
    path = tmp_path / "scan.h5"
    q, centres, truth = write_synthetic_nexus(path, 72, 40, measured_rotations=60)  # 150 of 180 degrees
    ranges = [(c - 0.4, c + 0.4) for c in centres]
    tomos = tomo.write_tomograms(path, q_ranges=ranges, engine="cpu", center="auto")
    assert tomos.reconstruction.n_used == 60
    with h5py.File(path, "r") as f:
        entry = f["entry"]
        assert text(entry.attrs["default"]) == "integrated"  # untouched unless asked
        g = entry["tomogram"]
        assert text(g.attrs["NX_class"]) == "NXdata"
        signal = g[text(g.attrs["signal"])]
        assert signal.shape == (3, 40, 40) and signal.dtype == np.float32
        axes = [text(a) for a in g.attrs["axes"]]
        assert axes == ["channel", "y", "x"]
        for i, name in enumerate(axes):
            assert g[name].shape == (signal.shape[i],) and "units" in g[name].attrs
            assert int(g.attrs[f"{name}_indices"]) == i
        np.testing.assert_allclose(g["x"][()], np.arange(40) - 19.5)
        np.testing.assert_allclose(g["y"][()], np.arange(40) - 19.5)
        bin_range = g["bin_range"][()]
        q_range = g["q_range"][()]
        assert text(g["q_range"].attrs["units"]) == "1/nm"
        for k, (lo, hi) in enumerate(ranges):
            a, b = bin_range[k]
            np.testing.assert_allclose(q_range[k], [q[a], q[b - 1]])
            assert lo <= q_range[k][0] <= q_range[k][1] <= hi
        labels = [text(v) for v in g["channel_label"][()]]
        assert labels[0].startswith("q ") and labels[0].endswith("1/nm")
        assert g["rotation_used"][()].sum() == 60 and g["rotation_angle"].shape == (72,)
        assert abs(float(g["reconstruction_center"][()]) - 19.5) < 0.1
        images = signal[()]
    for p in range(3):
        corr, _ = scores(images[p], truth[p])  # correlation only: the tomogram is in pattern-intensity units
        print(f"NeXus synthetic (150 of 180 deg measured) {PHASES[p].name}: r={corr:.3f}")
        assert corr > 0.85
    # written again at the end, as the default: a viewer following @default lands on the tomogram
    tomo.write_tomograms(path, bins=[(10, 12), (40, 41)], engine="cpu", set_default=True)
    with h5py.File(path, "r") as f:
        entry = f[text(f.attrs["default"])]
        nxdata = entry[text(entry.attrs["default"])]
        assert nxdata.name == "/entry/tomogram"
        signal = nxdata[text(nxdata.attrs["signal"])]
        assert signal.shape == (2, 40, 40)
        assert nxdata["bin_range"][()].tolist() == [[10, 12], [40, 41]]
        assert "sinogram" in entry and "integrated" in entry  # the rest of the file is intact
    png = tomo.save_nexus_tomogram_png(path, tmp_path / "tomo.png")
    width, height, colour = read_png(png)
    assert colour == 2 and width >= 2 * 40 and height >= 2 * 72  # two rows of [sinogram (72 x 40) | tomogram]


def test_save_tomogram_png(tmp_path, sinos):
    images = tomo.fbp(sinos, ANGLES, engine="cpu")
    partial = sinos.copy()
    partial[:, 90:] = np.nan
    width, height, _ = read_png(tomo.save_tomogram_png(tmp_path / "a.png", images, partial))
    assert width >= 3 * N and height >= 3 * 180  # three rows of [sinogram | tomogram | RGB overlay]
    width1, height1, _ = read_png(tomo.save_tomogram_png(tmp_path / "b.png", images[0]))
    assert width1 == height1 >= 240


# -- end to end: detector frames -> pyFAI -> NeXus -> tomograms ---------------------------------------------


@pytest.mark.slow
def test_end_to_end_simulated_scan(tmp_path):
    """A small simulated scan, every frame a Poisson detector image integrated by pyFAI, written by the pipeline's
    NeXus writer; the tomograms of one peak of each phase agree with the phase maps."""
    from pipeline.config import ReductionConfig
    from pipeline.geometry import build_setup
    from pipeline.nexus import STATUS_OK, NexusWriter
    from pipeline.results import FrameResult
    from pipeline.simulate import SimulatedScan

    sim = SimulatedScan(rotations=8, translations=12, seed=5, counts=3000.0, bad_pixels=50)
    setup = build_setup(ReductionConfig(poni_text=sim.poni_text, bins=400, engine="cpu"))
    path = tmp_path / "sim.h5"
    writer = NexusWriter(path, setup.radial, "q_nm^-1", sim.scan, json.dumps({}), sim.poni_text, "cpu")
    try:
        for frame in sim.scan.frames():
            res = setup.integrator.integrate1d(sim.image(frame), setup.nbins, **setup.pyfai_kwargs())
            writer.add(frame, frame, FrameResult(res.intensity.astype(np.float32), None,
                                                 np.ones(setup.nbins, np.float32)), STATUS_OK)
    finally:
        writer.close()
    # a peak of each phase that no other phase has (q in 1/nm): CeO2 111, Al 111, Ni 200
    peaks = [(19.6, 20.6), (26.4, 27.4), (35.2, 36.2)]
    tomos = tomo.write_tomograms(path, q_ranges=peaks, engine="cpu", filter_name="shepp-logan", set_default=True)
    for p, phase in enumerate(PHASES):
        corr, _ = scores(tomos.images[p], sim.phase_maps[p])
        print(f"end to end ({sim.rotations} x {sim.translations}) {phase.name}: r={corr:.3f}")
        assert corr > 0.8
    auto = tomo.reconstruct_nexus(path, n_peaks=3, engine="cpu")  # channels picked from the mean pattern
    assert len(auto.bin_ranges) == 3 and auto.images.shape == (3, sim.translations, sim.translations)
    read_png(tomo.save_nexus_tomogram_png(path, tmp_path / "sim.png"))
