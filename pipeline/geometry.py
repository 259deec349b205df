"""From a configuration to the integration operator shared by every engine.

pyFAI computes the sparse matrix (same pixel splitting, same bin edges, same
radial axis as its own ``integrate1d``); we keep it in two layouts:
CSR (bin-major, read by the OpenCL kernel) and CSC (pixel-major, used by the
fused CPU decode-and-integrate loop).  The per-pixel normalisation (solid angle
times polarization) and the per-bin sums over statically valid pixels are
computed once, so a frame costs one pass over its pixels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, ReductionConfig, parse_poni

logger = logging.getLogger(__name__)


def load_mask(path: str | Path, shape: tuple[int, int] | None = None,
              allowed: Sequence[str | Path] | None = None) -> np.ndarray:
    """Read a mask (EDF, TIFF, CBF, NPY or HDF5 ``file.h5::/path``); non-zero = masked.

    ``allowed``: directories the file must lie in (symbolic links resolved, see :mod:`pipeline.paths`);
    None reads any path (the caller checked it).  An HDF5 mask must be a plain dataset of that very
    file: external links, external raw storage and virtual datasets (which would read other files)
    are refused.
    """
    from .paths import resolve_mask, split_h5

    if allowed is not None:
        path = resolve_mask(allowed, str(path))
    text, h5_path = split_h5(str(path))
    suffix = Path(text).suffix.lower()
    try:
        if suffix == ".npy":
            mask = np.load(text, allow_pickle=False)
        elif suffix in (".h5", ".hdf5", ".nxs", ".hdf"):
            import h5py

            with h5py.File(text, "r") as handle:
                if h5_path is None:
                    names = [k for k in handle if isinstance(handle.get(k, getlink=True), h5py.HardLink)
                             and isinstance(handle[k], h5py.Dataset) and handle[k].ndim == 2]
                    if len(names) != 1:
                        raise ConfigError(f"{text}: name the mask dataset as file.h5::/path")
                    h5_path = names[0]
                mask = _h5_mask(handle, text, h5_path)
        else:
            import fabio

            mask = fabio.open(text).data
    except ConfigError:
        raise
    except Exception as exc:  # any reader failure becomes one clear message
        raise ConfigError(f"cannot read mask {path}: {exc}") from exc
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ConfigError(f"mask {path} is not a 2D image (shape {mask.shape})")
    if shape is not None and mask.shape != tuple(shape):
        raise ConfigError(f"mask {path} has shape {mask.shape}, frames have {tuple(shape)}")
    return mask != 0


def _h5_mask(handle, filename: str, inner: str) -> np.ndarray:
    """The dataset ``inner`` of an open HDF5 file, refusing anything that reads another file."""
    import h5py

    parts = [p for p in inner.split("/") if p]
    if not parts:
        raise ConfigError(f"{filename}: empty dataset path {inner!r}")
    node = handle
    for part in parts:
        link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
        if link is None:
            raise ConfigError(f"{filename}: no dataset {inner}")
        if isinstance(link, h5py.ExternalLink):
            raise ConfigError(f"{filename}::{inner} is an external link to another file: refused")
        node = node[part]
    if not isinstance(node, h5py.Dataset):
        raise ConfigError(f"{filename}::{inner} is not a dataset")
    if os.path.realpath(node.file.filename) != os.path.realpath(filename):
        raise ConfigError(f"{filename}::{inner} leads to another file: refused")
    if node.is_virtual or node.external:
        raise ConfigError(f"{filename}::{inner} stores its data in other files (virtual or external dataset): refused")
    return node[()]


def make_integrator(poni_text: str):
    """pyFAI AzimuthalIntegrator from validated PONI text."""
    import pyFAI

    values = parse_poni(poni_text)
    try:
        return pyFAI.load(dict(values))
    except Exception as exc:
        raise ConfigError(f"pyFAI rejects the geometry: {exc}") from exc


def pyfai_method(split: str) -> tuple[str, str, str]:
    """The pyFAI method our engines reproduce for a pixel-splitting choice."""
    return (split, "csr", "cython")


def _operator_kwargs(config: ReductionConfig, mask: np.ndarray) -> dict:
    """The ``integrate1d`` arguments that fix pyFAI's sparse matrix and corrections."""
    return dict(method=pyfai_method(config.split), unit=config.unit, mask=mask.astype(np.int8),
                correctSolidAngle=config.solid_angle, polarization_factor=config.polarization,
                radial_range=config.radial_range)


@dataclass
class IntegrationSetup:
    """Everything an engine needs, derived once from the configuration."""

    config: ReductionConfig
    shape: tuple[int, int]
    mask: np.ndarray  # bool, True = masked (detector gaps merged with the user mask)
    radial: np.ndarray  # bin centres in the configured unit (float64)
    unit: str
    unit_label: str
    # CSR, bin-major: coefficients, pixel indices, row pointers
    csr_data: np.ndarray
    csr_indices: np.ndarray
    csr_indptr: np.ndarray
    # CSC, pixel-major: coefficients, bin indices, column pointers
    csc_data: np.ndarray
    csc_indices: np.ndarray
    csc_indptr: np.ndarray
    norm: np.ndarray  # float32 per pixel: solid angle * polarization
    static_norm: np.ndarray  # float64 per bin: sum c*norm over statically valid pixels
    static_norm_sq: np.ndarray  # sum c^2 norm^2
    static_count: np.ndarray  # sum c
    dummy: float | None
    delta_dummy: float
    empty: float
    integrator: object  # pyFAI AzimuthalIntegrator, for references and metadata

    @property
    def n_pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbins(self) -> int:
        return self.radial.shape[0]

    @property
    def dummy_range(self) -> tuple[float, float, bool]:
        """(low, high, active): pixel values in [low, high] are invalid for this frame."""
        if self.dummy is None:
            return 0.0, -1.0, False
        return self.dummy - self.delta_dummy, self.dummy + self.delta_dummy, True

    @property
    def is_histogram(self) -> bool:
        """True for no pixel splitting: each pixel feeds one bin with weight 1."""
        return bool(np.all(np.diff(self.csc_indptr) <= 1) and np.all(self.csc_data == 1.0))

    def pyfai_kwargs(self) -> dict:
        """Arguments that make ``integrate1d`` compute what our engines compute."""
        return dict(_operator_kwargs(self.config, self.mask), dummy=self.dummy,
                    delta_dummy=self.delta_dummy if self.dummy is not None else None,
                    error_model="poisson" if self.config.error_model == "poisson" else None)


def build_setup(config: ReductionConfig, shape: tuple[int, int] | None = None) -> IntegrationSetup:
    """Validate ``config`` and derive the integration operator for frames of ``shape``."""
    import scipy.sparse

    config.validate()
    ai = make_integrator(config.poni_text)
    detector = ai.detector
    det_shape = tuple(detector.shape) if detector.shape is not None else None
    if shape is None:
        if det_shape is None:
            raise ConfigError("the PONI names no detector shape; the frame shape is needed")
        shape = det_shape
    shape = (int(shape[0]), int(shape[1]))
    if det_shape is not None and det_shape != shape:
        raise ConfigError(f"frames of shape {shape} do not fit detector {detector.name} of shape {det_shape}")
    if det_shape is None:
        detector.shape = detector.max_shape = shape

    mask = np.zeros(shape, dtype=bool)
    det_mask = detector.mask
    if det_mask is not None:
        mask |= np.asarray(det_mask, dtype=bool)
    if config.mask_path:
        mask |= load_mask(config.mask_path, shape)

    if config.dummy is not None:
        dummy, delta = float(config.dummy), float(config.delta_dummy or 0.0)
    else:
        d, dd = detector.get_dummies(np.zeros(1, np.int32))
        dummy = None if d is None else float(d)
        delta = float(dd) if dd is not None else 0.0

    # Let pyFAI build its own sparse matrix exactly as integrate1d would.
    probe = np.zeros(shape, dtype=np.float32)
    try:
        res = ai.integrate1d(probe, config.bins, **_operator_kwargs(config, mask))
    except Exception as exc:
        raise ConfigError(f"pyFAI cannot build the integrator: {exc}") from exc
    engine = ai.engines[res.method].engine
    csr_data, csr_indices, csr_indptr = (np.ascontiguousarray(a) for a in engine.lut)
    n_pix = shape[0] * shape[1]
    matrix = scipy.sparse.csr_matrix((csr_data, csr_indices, csr_indptr), shape=(config.bins, n_pix))
    csc = matrix.tocsc()
    csc.sort_indices()

    norm = np.ones(n_pix, dtype=np.float32)
    if config.polarization is not None:
        norm *= ai.polarization(shape, config.polarization).astype(np.float32).ravel()
    if config.solid_angle:
        norm *= ai.solidAngleArray(shape, True).astype(np.float32).ravel()
    coef = csr_data.astype(np.float64)
    pix_norm = norm.astype(np.float64)[csr_indices]
    rows = np.repeat(np.arange(config.bins), np.diff(csr_indptr))
    static_norm = np.bincount(rows, coef * pix_norm, minlength=config.bins)
    static_norm_sq = np.bincount(rows, (coef * pix_norm) ** 2, minlength=config.bins)
    static_count = np.bincount(rows, coef, minlength=config.bins)

    return IntegrationSetup(
        config=config, shape=shape, mask=mask, radial=np.asarray(res.radial, dtype=np.float64),
        unit=config.unit, unit_label={"q_nm^-1": "nm^-1", "q_A^-1": "Å^-1", "2th_deg": "deg"}[config.unit],
        csr_data=csr_data.astype(np.float32), csr_indices=csr_indices.astype(np.int32),
        csr_indptr=csr_indptr.astype(np.int32),
        csc_data=csc.data.astype(np.float32), csc_indices=csc.indices.astype(np.int32),
        csc_indptr=csc.indptr.astype(np.int32),
        norm=norm, static_norm=static_norm, static_norm_sq=static_norm_sq, static_count=static_count,
        dummy=dummy, delta_dummy=delta, empty=float(engine.empty if engine.empty is not None else 0.0),
        integrator=ai,
    )
