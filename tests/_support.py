"""Helpers shared by the test modules: where the real Pilatus files are, and a small CBF writer.

(Imported as ``_support``: ``conftest`` is ambiguous once several test folders have one.)
"""

from __future__ import annotations

import bz2
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REAL = Path(os.environ.get("XRDCT_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))


def real_file(name: str, tmp_dir: Path) -> Path:
    """A real data file, decompressed into ``tmp_dir`` when stored as .gz/.bz2."""
    for suffix, opener in (("", None), (".gz", gzip.open), (".bz2", bz2.open)):
        path = REAL / (name + suffix)
        if path.exists():
            if opener is None:
                return path
            out = tmp_dir / Path(name).name
            if not out.exists():
                with opener(path, "rb") as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            return out
    pytest.skip(f"real data file {name} not available")


def write_cbf(path: Path, data: np.ndarray) -> Path:
    import fabio.cbfimage

    fabio.cbfimage.CbfImage(data=np.ascontiguousarray(data, dtype=np.int32)).write(str(path))
    return path
