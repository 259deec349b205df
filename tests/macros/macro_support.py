"""Helpers of the macro tests: the Tango test helpers and the macro folder on sys.path.

(Named ``macro_support`` so that no module called ``conftest`` is ever imported from.)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACRO_DIR = ROOT / "resources" / "sardana"
for _p in (str(Path(__file__).resolve().parents[1] / "tango"), str(MACRO_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tango_support import (  # noqa: E402
    ROT,
    TRANS,
    FastWriter,
    configure,
    dirs,
    make_device,
    props,
    sim_scan,
    wait_for,
)

__all__ = ["MACRO_DIR", "ROT", "TRANS", "FastWriter", "configure", "dirs", "make_device", "props", "sim_scan",
           "wait_for"]
