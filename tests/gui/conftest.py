"""Fixtures of the panel tests (defined in ``gui_support``)."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from gui_support import dirs, reducer, sim_scan  # noqa: E402,F401
