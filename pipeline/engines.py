"""Engine selection and the interface every engine offers.

An engine takes a batch of parsed frames (:class:`~pipeline.cbf.CbfFrame`) and
returns one :class:`~pipeline.results.FrameResult` (or the exception that
frame raised) per frame, in order.  ``batch_size`` is how many frames it
likes per call and ``concurrency`` how many calls may run at once, so the
runner, the tests and the benchmark drive the CPU and OpenCL engines alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .config import ReductionConfig
from .geometry import IntegrationSetup

logger = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """The engine itself broke (device lost, kernel failure): redo the batch elsewhere."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_engine(setup: IntegrationSetup, config: ReductionConfig,
                on_event: Callable[[str, str], None] | None = None):
    """The configured engine; ``auto`` takes an OpenCL GPU when there is one, else the CPU."""
    from .cpu_engine import CpuEngine

    say = on_event or (lambda kind, text: logger.info("%s: %s", kind, text))
    choice = config.engine
    if choice in ("opencl", "auto"):
        try:
            from .opencl.engine import OpenCLEngine, find_device

            device = find_device(config.opencl_device, gpu_only=(choice == "auto" and not config.opencl_device))
            if device is not None:
                engine = OpenCLEngine(setup, device, batch_size=config.batch_size)
                say("engine", f"using {engine.description}")
                return engine
            if choice == "opencl":
                raise EngineFailure(f"no OpenCL device matches {config.opencl_device or 'any'}")
            say("engine", "no OpenCL GPU found; using the CPU engine")
        except ImportError as exc:
            if choice == "opencl":
                raise EngineFailure(f"OpenCL engine unavailable: {exc}") from exc
            say("engine", f"OpenCL unavailable ({exc}); using the CPU engine")
        except EngineFailure:
            if choice == "opencl":
                raise
            say("engine", "OpenCL set-up failed; using the CPU engine")
    return CpuEngine(setup, workers=config.workers)
