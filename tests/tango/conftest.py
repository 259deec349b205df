"""Fixtures of the Tango tests (defined in ``tango_support`` with the helpers the tests import)."""

from tango_support import dirs, make_device, offline, sim_scan  # noqa: F401
