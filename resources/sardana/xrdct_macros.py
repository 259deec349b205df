"""Sardana macros driving the XRDCTReducer Tango device (live XRD-CT reduction).

Set the device once per session:        senv XRDCTDevice xrdct/reducer/bl11
Then:
    xrdct_start sample_A 180x100          start reducing into sample_A.h5 for a 180x100 scan ('' '' = auto/keep)
    xrdct_wait 18000 600                   wait until 18000 frames are reduced (Ctrl+C stops the reduction)
    xrdct_status                           state, counters, output file
    xrdct_stop                             finish the landed frames, close the file
Around every scan (general hooks):      defgh xrdct_pre_scan pre-scan
                                        defgh xrdct_post_scan post-scan
    The pre-scan hook starts a reduction into <XRDCTPrefix><ScanID>.h5 (XRDCTPrefix default "scan_") with the
    scan shape in XRDCTScanShape when set (otherwise the device's); the post-scan hook stops it.

All device logic lives in ``_xrdct_macro_logic.py`` (same directory, not loaded as a macro library).
"""

from _xrdct_macro_logic import (
    DEVICE_ENV,
    PREFIX_ENV,
    SHAPE_ENV,
    Reduction,
    XRDCTError,
    connect,
    hook_output_name,
)
from sardana.macroserver.macro import Macro, Type

__all__ = ["xrdct_start", "xrdct_stop", "xrdct_wait", "xrdct_status", "xrdct_pre_scan", "xrdct_post_scan"]


class _XRDCTMacro:
    """Common part of the macros (a mixin, so that the MacroServer does not list it as a macro)."""

    def _env(self, name, default=None):
        try:
            return self.getEnv(name)
        except Exception:  # UnknownEnv
            return default

    def _reduction(self) -> Reduction:
        return Reduction(connect(self._env(DEVICE_ENV, "")), log=self.output)

    def _fail(self, exc: XRDCTError):
        raise Exception(str(exc)) from None  # the Door shows the message, not a Tango traceback


class xrdct_start(_XRDCTMacro, Macro):
    """Start the XRD-CT reduction for a scan; the result is the output file path."""

    param_def = [
        ["name", Type.String, "", "output file name relative to the device's OutputDirectory ('' = automatic)"],
        ["scan_shape", Type.String, "", "scan shape NROTxNTRANS ('' = keep the device's)"],
    ]
    result_def = [["path", Type.String, None, "output file path"]]

    def run(self, name, scan_shape):
        try:
            return self._reduction().start(name, scan_shape)
        except XRDCTError as exc:
            self._fail(exc)


class xrdct_stop(_XRDCTMacro, Macro):
    """Stop the XRD-CT reduction (the frames already landed are finished, the file is closed)."""

    param_def = [["timeout", Type.Float, 30.0, "seconds to wait for the device to be ON again"]]

    def run(self, timeout):
        try:
            self._reduction().stop(timeout, check=self.checkPoint)
        except XRDCTError as exc:
            self._fail(exc)


class xrdct_wait(_XRDCTMacro, Macro):
    """Wait until N frames are reduced.  Stopping/aborting the macro stops the reduction."""

    param_def = [
        ["nframes", Type.Integer, None, "number of reduced frames to wait for"],
        ["timeout", Type.Float, 0.0, "seconds (0 = no limit)"],
    ]
    result_def = [["reduced", Type.Integer, None, "frames reduced"]]

    def prepare(self, nframes, timeout):
        self._red = self._reduction()

    def run(self, nframes, timeout):
        def progress(done, total):
            self.output(f"{done}/{total} frames reduced")

        try:
            return self._red.wait_frames(nframes, timeout, check=self.checkPoint, progress=progress)
        except XRDCTError as exc:
            self._fail(exc)

    def on_abort(self):
        # wait_frames already stopped the device when checkPoint raised; this covers an abort elsewhere
        red = getattr(self, "_red", None)
        if red is not None:
            try:
                red.stop(timeout=10)
            except Exception as exc:
                self.warning(f"could not stop the XRD-CT reduction: {exc}")


class xrdct_status(_XRDCTMacro, Macro):
    """Print the state, status, counters and output file of the XRD-CT reducer."""

    def run(self):
        try:
            self.output(self._reduction().status())
        except XRDCTError as exc:
            self._fail(exc)


class xrdct_pre_scan(_XRDCTMacro, Macro):
    """Pre-scan hook: start a reduction into <XRDCTPrefix><ScanID>.h5 (defgh xrdct_pre_scan pre-scan)."""

    def run(self):
        name = hook_output_name(self._env(PREFIX_ENV, "scan_"), self._env("ScanID"))
        try:
            self._reduction().start(name, self._env(SHAPE_ENV, "") or "")
        except XRDCTError as exc:
            self._fail(exc)


class xrdct_post_scan(_XRDCTMacro, Macro):
    """Post-scan hook: stop the reduction started by xrdct_pre_scan (defgh xrdct_post_scan post-scan)."""

    def run(self):
        try:
            self._reduction().stop(check=self.checkPoint)
        except XRDCTError as exc:
            self._fail(exc)
