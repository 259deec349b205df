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


def pytest_collection_modifyitems(config, items):
    """Run the tests that leave threads in the test process (Qt, Taurus, a MacroServer) last: a device
    server forked after them (DeviceTestContext(process=True)) can deadlock on a lock one of them held
    (seen in CI: "Failed to get GIOP TCP port within 24.0 sec")."""
    def rank(item):
        mark = item.get_closest_marker("leaves_threads")
        return (0, 0) if mark is None else (1, mark.kwargs.get("order", 0))

    items.sort(key=rank)
