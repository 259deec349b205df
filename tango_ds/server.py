"""Server executable: ``XRDCTReducer <instance>`` (Tango convention)."""

from __future__ import annotations

import logging
import sys


def main(args: list[str] | None = None) -> None:
    """Run the XRDCTReducer device server; arguments as for any Tango server (instance name first)."""
    from tango.server import run

    from .device import XRDCTReducer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = ["XRDCTReducer", *(sys.argv[1:] if args is None else args)]
    run((XRDCTReducer,), args=argv)


if __name__ == "__main__":
    main()
