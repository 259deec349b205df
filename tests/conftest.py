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


@pytest.fixture
def small_disk_of(tmp_path):
    """``mount(size)`` -> a directory on a tmpfs of that size, unmounted after the test (a full disk on
    demand; needs root and the right to mount, as on the CI machine, else the test is skipped)."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small file system needs root")
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
