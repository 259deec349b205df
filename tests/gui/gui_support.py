"""Helpers of the panel tests: the Tango test helpers (``tests/tango/tango_support``) and a running device.

(Named ``gui_support`` so that no module called ``conftest`` is ever imported from.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TANGO_TESTS = str(Path(__file__).resolve().parents[1] / "tango")
if _TANGO_TESTS not in sys.path:
    sys.path.insert(0, _TANGO_TESTS)

from tango_support import BINS, ROT, TRANS, configure, dirs, props, sim_scan, wait_for  # noqa: E402

__all__ = ["BINS", "ROT", "TRANS", "configure", "dirs", "props", "sim_scan", "wait_for", "reducer"]

TEST_OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


@pytest.fixture
def reducer(dirs):  # noqa: F811 - the fixture imported above
    """A running XRDCTReducer (DeviceTestContext, process=True): (proxy, taurus device name, landing, output)."""
    from tango.test_context import DeviceTestContext
    from taurus.core.tango.tangovalidator import TangoDeviceNameValidator

    from tango_ds.device import XRDCTReducer

    landing, output = dirs
    ctx = DeviceTestContext(XRDCTReducer, properties=props(landing, output), process=True, timeout=30)
    proxy = ctx.__enter__()
    try:
        name = TangoDeviceNameValidator().getNames(ctx.get_device_access())[0]
        yield proxy, name, landing, output
    finally:
        try:
            ctx.__exit__(None, None, None)
        except Exception:  # stop() may raise in 10.x; the process is gone either way
            pass
