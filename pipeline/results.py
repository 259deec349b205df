"""Per-frame results and the final step shared by all engines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FrameResult:
    """One integrated pattern.  ``sigma`` is the standard error of the mean (pyFAI's ``sem``)."""

    intensity: np.ndarray  # float32 [nbins]
    sigma: np.ndarray | None  # float32 [nbins]
    count: np.ndarray  # float32 [nbins]: sum of pixel weights that contributed


def finish_sums(setup, sig, var, dnorm, dnorm_sq, dcount, poisson: bool) -> FrameResult:
    """Divide the accumulated sums as pyFAI does (empty bins get ``setup.empty``)."""
    norm = setup.static_norm - dnorm
    count = setup.static_count - dcount
    empty = norm <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity = np.where(empty, setup.empty, sig / norm).astype(np.float32)
        sigma = None
        if poisson:
            sigma = np.where(empty, setup.empty, np.sqrt(var) / norm).astype(np.float32)
    return FrameResult(intensity=intensity, sigma=sigma, count=count.astype(np.float32))


def integrate_image_reference(setup, image: np.ndarray) -> FrameResult:
    """Integrate a decoded image with plain numpy/scipy (slow, for checks)."""
    import scipy.sparse

    values = image.reshape(-1).astype(np.float32).astype(np.float64)
    lo, hi, active = setup.dummy_range
    invalid = (values >= lo) & (values <= hi) if active else np.zeros(values.shape, bool)
    matrix = scipy.sparse.csr_matrix(
        (setup.csr_data.astype(np.float64), setup.csr_indices, setup.csr_indptr),
        shape=(setup.nbins, setup.n_pixels))
    valid = ~invalid
    norm = setup.norm.astype(np.float64)
    sig = matrix @ np.where(valid, values, 0.0)
    var = matrix.multiply(matrix) @ np.where(valid, np.maximum(values, 1.0), 0.0)
    dnorm = matrix @ np.where(invalid, norm, 0.0)
    dnorm_sq = matrix.multiply(matrix) @ np.where(invalid, norm * norm, 0.0)
    dcount = matrix @ invalid.astype(np.float64)
    return finish_sums(setup, sig, var, dnorm, dnorm_sq, dcount, setup.config.error_model == "poisson")
