"""Logic of the XRD-CT Sardana macros (``xrdct_macros.py``), kept free of Sardana so it is testable on its own.

Importing this module needs neither Sardana nor Tango (``tango`` is imported only by :func:`connect`); the
functions take any object with the ``DeviceProxy`` methods used here.  Device errors (``tango.DevFailed``)
are turned into :class:`XRDCTError` with a one-line, readable message.

The leading underscore keeps the MacroServer from loading this file as a macro library; the macro library
imports it from the same MacroPath directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEVICE_ENV = "XRDCTDevice"  # Sardana environment variable naming the XRDCTReducer device
PREFIX_ENV = "XRDCTPrefix"  # file name prefix used by the scan hooks (default "scan_")
SHAPE_ENV = "XRDCTScanShape"  # optional NROTxNTRANS written by the pre-scan hook
BUSY_STATES = ("RUNNING", "ALARM")


class XRDCTError(RuntimeError):
    """A readable error for the macro user (the message says what failed and, when known, what to do)."""


def describe(exc: BaseException) -> str:
    """One readable line for a DevFailed (its descriptions, outermost reason first) or any exception."""
    args = getattr(exc, "args", ())
    errors = [e for e in args if hasattr(e, "desc")]
    if errors:
        text = "; ".join(dict.fromkeys(str(e.desc).strip() for e in errors if str(e.desc).strip()))
        return f"{errors[0].reason}: {text}"
    return str(exc) or type(exc).__name__


def connect(name: str, timeout: float = 10.0):
    """A ``tango.DeviceProxy`` for ``name`` that answers, or :class:`XRDCTError`."""
    import tango

    if not name:
        raise XRDCTError(f"no XRDCTReducer device given: set it with  senv {DEVICE_ENV} <device name>")
    try:
        proxy = tango.DeviceProxy(name)
        proxy.set_timeout_millis(int(timeout * 1000))
        proxy.ping()
    except tango.DevFailed as exc:
        raise XRDCTError(f"cannot reach the XRDCTReducer device {name}: {describe(exc)}") from None
    return proxy


def _call(what: str, fn, *args):
    try:
        return fn(*args)
    except XRDCTError:
        raise
    except Exception as exc:  # DevFailed and friends -> readable
        if type(exc).__name__ in ("DevFailed", "ConnectionFailed", "CommunicationFailed", "DeviceUnlocked"):
            raise XRDCTError(f"{what} failed: {describe(exc)}") from None
        raise


def state_name(dev) -> str:
    return str(_call("reading the device state", dev.state))


class Reduction:
    """Drive one XRDCTReducer device: start/stop a reduction, wait for frames, report status."""

    def __init__(self, dev, log: Callable[[str], None] = print, period: float = 0.2):
        self.dev = dev
        self.log = log
        self.period = period

    @property
    def state(self) -> str:
        return state_name(self.dev)

    def read(self, attr: str):
        return _call(f"reading {attr}", self.dev.read_attribute, attr).value

    def start(self, name: str = "", scan_shape: str = "") -> str:
        """Start a reduction into ``name`` (relative to OutputDirectory, '' = automatic) for ``scan_shape``
        ('' keeps the device's).  Returns the output file path."""
        state = self.state
        if state in BUSY_STATES:
            raise XRDCTError(f"the reducer is already {state} (writing {self.read('output_file')}): "
                             "stop it first with xrdct_stop")
        if state == "FAULT":
            raise XRDCTError(f"the reducer is in FAULT: {_call('reading status', self.dev.status)}")
        if scan_shape:
            _call(f"setting scan_shape to {scan_shape!r}", self.dev.write_attribute, "scan_shape", scan_shape)
        path = _call("Start", self.dev.command_inout, "Start", name or "")
        self.log(f"XRD-CT reduction started: {path} (scan {self.read('scan_shape')}, "
                 f"frames from {self.read('landing_directory')})")
        return path

    def stop(self, timeout: float = 30.0, check: Callable[[], None] | None = None) -> str:
        """Stop a running reduction (the frames already landed are finished, the file is closed) and wait
        until the device is ON again.  Does nothing when it is not running.  Returns the final state."""
        state = self.state
        if state in BUSY_STATES:
            try:
                _call("Stop", self.dev.command_inout, "Stop")
            except XRDCTError:
                if self.state in BUSY_STATES:  # not a race with the scan ending by itself
                    raise
        end = time.monotonic() + timeout
        while self.state in BUSY_STATES:
            if check is not None:
                check()
            if time.monotonic() > end:
                raise XRDCTError(f"the reducer did not stop within {timeout:.0f} s: {self.dev.status()}")
            time.sleep(self.period)
        state = self.state
        self.log(f"XRD-CT reduction stopped: {state}, {self.read('frames_processed')} frames reduced "
                 f"into {self.read('output_file')}")
        return state

    def wait_frames(self, n: int, timeout: float = 0.0, check: Callable[[], None] | None = None,
                    progress: Callable[[int, int], None] | None = None, stop_on_interrupt: bool = True) -> int:
        """Wait until ``n`` frames are reduced (processed).  ``check`` is called every cycle (a Sardana
        ``checkPoint``): whatever it raises (abort, stop) stops the reduction first when ``stop_on_interrupt``,
        then propagates.  ``timeout`` 0 waits forever.  Returns the number of frames processed."""
        start = time.monotonic()
        last = -1
        try:
            while True:
                if check is not None:
                    check()
                done = int(self.read("frames_processed"))
                if done != last and progress is not None:
                    progress(done, n)
                last = done
                if done >= n:
                    return done
                state = self.state
                if state == "FAULT":
                    raise XRDCTError(f"the reducer went to FAULT after {done} frames: {self.dev.status()}")
                if state not in BUSY_STATES:
                    missing, failed = self.read("frames_missing"), self.read("frames_failed")
                    raise XRDCTError(f"the reduction ended ({state}) with {done} of {n} frames reduced "
                                     f"({missing} missing, {failed} failed): {self.dev.status()}")
                if timeout and time.monotonic() - start > timeout:
                    raise XRDCTError(f"timeout: only {done} of {n} frames reduced after {timeout:.0f} s")
                time.sleep(self.period)
        except BaseException:
            if stop_on_interrupt:
                self.log("interrupted: stopping the XRD-CT reduction")
                try:
                    self.stop()
                except Exception as exc:  # report, but keep the original exception
                    self.log(f"could not stop the reducer: {describe(exc)}")
            raise

    def status(self) -> str:
        """A few readable lines on the device."""
        values = {a: self.read(a) for a in ("frames_processed", "frames_expected", "frames_missing", "frames_failed",
                                            "backlog", "throughput", "output_file", "scan_shape", "bins", "engine")}
        return "\n".join([
            f"{self.dev.dev_name()}: {self.state}",
            _call("reading status", self.dev.status),
            f"frames: {values['frames_processed']} reduced of {values['frames_expected']} expected, "
            f"{values['frames_missing']} missing, {values['frames_failed']} failed, backlog {values['backlog']}, "
            f"{values['throughput']:.1f} frames/s",
            f"scan {values['scan_shape'] or '-'}, {values['bins']} bins, engine {values['engine']}",
            f"output: {values['output_file'] or '-'}",
        ])


def hook_output_name(prefix: str, scan_id) -> str:
    """Output name used by the pre-scan hook: ``<prefix><ScanID, 5 digits>.h5``."""
    try:
        return f"{prefix}{int(scan_id):05d}.h5"
    except (TypeError, ValueError):
        return f"{prefix}{time.strftime('%Y%m%d_%H%M%S')}.h5"
