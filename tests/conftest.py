"""Shared fixtures (helpers live in ``_support``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _support import REAL

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory) -> Path:
    if not REAL.is_dir():
        pytest.skip("shared real data not available")
    return tmp_path_factory.mktemp("real")
