"""CPU integration against pyFAI's integrate1d with the same method."""

from __future__ import annotations

import fabio
import numpy as np
import pytest
from _support import REAL, write_cbf

from pipeline import cbf
from pipeline.config import ConfigError, ReductionConfig, parse_poni
from pipeline.cpu_engine import CpuEngine
from pipeline.geometry import build_setup

CEO2 = REAL / "ndtomo"


def assert_matches_pyfai(result, ref, rtol=2e-6):
    """Equal within float32 rounding (pyFAI also accumulates in float64)."""
    assert result.intensity.shape == ref.intensity.shape
    np.testing.assert_allclose(result.intensity, ref.intensity, rtol=rtol, atol=1e-30)
    if result.sigma is not None:
        np.testing.assert_allclose(result.sigma, ref.sigma, rtol=rtol, atol=1e-30)


@pytest.fixture(scope="module")
def ceo2():
    if not (CEO2 / "CeO2.cbf").exists():
        pytest.skip("CeO2 data not available")
    frame = cbf.read_frame(CEO2 / "CeO2.cbf", check_md5=True)
    return frame, fabio.open(str(CEO2 / "CeO2.cbf")).data


@pytest.mark.parametrize("split", ["no", "bbox", "full"])
@pytest.mark.parametrize("unit", ["q_nm^-1", "2th_deg", "q_A^-1"])
def test_ceo2_matches_pyfai(ceo2, split, unit):
    frame, image = ceo2
    config = ReductionConfig.from_files(CEO2 / "CeO2.poni", mask_path=str(CEO2 / "mask.edf"), bins=800,
                                        split=split, unit=unit, polarization=0.95)
    setup = build_setup(config)
    result = CpuEngine(setup).integrate(frame)
    ref = setup.integrator.integrate1d(image, 800, **setup.pyfai_kwargs())
    assert_matches_pyfai(result, ref)
    np.testing.assert_allclose(setup.radial, ref.radial)
    # the reference path (scipy, decoded image) agrees too
    assert_matches_pyfai(CpuEngine(setup).integrate_image(image), ref)


def test_no_corrections_and_no_error_model(ceo2):
    frame, image = ceo2
    config = ReductionConfig.from_files(CEO2 / "CeO2.poni", bins=300, solid_angle=False, error_model="none")
    setup = build_setup(config)
    result = CpuEngine(setup).integrate(frame)
    assert result.sigma is None
    ref = setup.integrator.integrate1d(image, 300, **setup.pyfai_kwargs())
    np.testing.assert_allclose(result.intensity, ref.intensity, rtol=2e-6)


def test_ceo2_peaks_where_the_calibrant_says(ceo2):
    from pyFAI.calibrant import get_calibrant

    frame, _ = ceo2
    config = ReductionConfig.from_files(CEO2 / "CeO2.poni", mask_path=str(CEO2 / "mask.edf"), bins=3000,
                                        unit="2th_deg")
    setup = build_setup(config)
    result = CpuEngine(setup).integrate(frame)
    calibrant = get_calibrant("CeO2")
    calibrant.wavelength = setup.integrator.wavelength
    expected = np.rad2deg(np.array(calibrant.get_2th()))
    tth = setup.radial
    inside = expected[(expected > tth[0] + 0.2) & (expected < 12.0)]
    assert len(inside) >= 10
    step = tth[1] - tth[0]
    intensity = result.intensity
    for line in inside[:10]:
        window = np.abs(tth - line) < 0.06
        peak = tth[window][np.argmax(intensity[window])]
        assert abs(peak - line) <= 2 * step, f"peak at {peak:.4f} deg, calibrant line at {line:.4f} deg"
        background = np.median(intensity[np.abs(tth - line) < 0.4])
        assert intensity[window].max() > 1.5 * background


def _generic_poni(shape):
    return (f"Distance: 0.1\nPoni1: {shape[0] * 4e-5:.6f}\nPoni2: {shape[1] * 7e-5:.6f}\nRot1: 0.01\nRot2: 0.02\n"
            "Rot3: 0\nPixelSize1: 0.0001\nPixelSize2: 0.00012\nWavelength: 1e-10\n")


@pytest.mark.parametrize("shape", [(37, 53), (1, 64), (195, 487)])
@pytest.mark.parametrize("split", ["no", "full"])
def test_odd_shapes_negative_pixels_and_large_counts(tmp_path, shape, split):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    data = rng.poisson(200, shape).astype(np.int32)
    flat = data.reshape(-1)
    flat[rng.choice(flat.size, max(1, flat.size // 20), replace=False)] = -1  # gaps
    flat[rng.choice(flat.size, max(1, flat.size // 50), replace=False)] = -2  # bad pixels
    flat[rng.choice(flat.size, max(1, flat.size // 50), replace=False)] = rng.integers(2**16, 2**24, 1)
    path = write_cbf(tmp_path / "odd.cbf", data)
    mask = np.zeros(shape, np.uint8)
    mask[:, :2] = 1
    np.save(tmp_path / "mask.npy", mask)
    config = ReductionConfig(poni_text=_generic_poni(shape), mask_path=str(tmp_path / "mask.npy"), bins=40,
                             split=split, dummy=-2, delta_dummy=1.5, polarization=-0.3)
    setup = build_setup(config, shape=shape)
    result = CpuEngine(setup).integrate(cbf.read_frame(path))
    ref = setup.integrator.integrate1d(fabio.open(str(path)).data, 40, **setup.pyfai_kwargs())
    assert_matches_pyfai(result, ref)
    assert np.isfinite(result.intensity).all()


def test_frame_with_wrong_shape_is_rejected(tmp_path):
    shape = (37, 53)
    path = write_cbf(tmp_path / "other.cbf", np.ones((36, 53), np.int32))
    setup = build_setup(ReductionConfig(poni_text=_generic_poni(shape), bins=10), shape=shape)
    with pytest.raises(cbf.CorruptCbfError, match="shape"):
        CpuEngine(setup).integrate(cbf.read_frame(path))


@pytest.mark.parametrize("text, message", [
    ("Distance: 0.1\n", "lacks"),
    ("Distance: nan\nPoni1: 0\nPoni2: 0\nRot1: 0\nRot2: 0\nRot3: 0\nDetector: Pilatus2M\nWavelength: 1e-10", "finite"),
    ("Distance: __import__('os')\nPoni1: 0", "not a number"),
    ("Distance: 0.1\nPoni1: 0\nPoni2: 0\nRot1: 0\nRot2: 0\nRot3: 0\nDetector: Pilatus2M\nEvil: 1", "unknown"),
    ("Distance: 0.1\nPoni1: 0\nPoni2: 0\nRot1: 0\nRot2: 0\nRot3: 0\nDetector: Pilatus2M", "wavelength"),
])
def test_poni_parsed_strictly(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_poni(text)


def test_config_validation_messages(tmp_path):
    good = (CEO2 / "CeO2.poni").read_text() if (CEO2 / "CeO2.poni").exists() else _generic_poni((10, 10))
    for kwargs, message in [({"bins": 0}, "bins"), ({"bins": True}, "bins"), ({"unit": "r_mm"}, "unit"),
                            ({"split": "pseudo"}, "split"), ({"polarization": 2.0}, "polarization"),
                            ({"mask_path": str(tmp_path / "none.edf")}, "mask"), ({"engine": "cuda"}, "engine")]:
        with pytest.raises(ConfigError, match=message):
            ReductionConfig(poni_text=good, **kwargs).validate()
