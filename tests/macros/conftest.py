"""Fixtures of the macro tests (defined in ``macro_support``)."""

from macro_support import dirs, make_device, sim_scan  # noqa: F401
