"""Tango device ``XRDCTReducer``: a thin control-system face of :class:`pipeline.runner.Reducer`.

Design (see issue 4):

* Synchronous device; all work runs in worker threads.  Tango callbacks only
  translate attributes/commands into a :class:`ReductionConfig` and calls on a
  :class:`Reducer`; every reduction rule stays in ``pipeline``.
* One publisher thread (``tango.utils.PyTangoThread``, i.e. inside
  ``EnsureOmniThread``) samples the model every 0.2 s and pushes change events
  for State, Status, the counters, the config attributes and (at most 5 Hz)
  ``last_pattern``/``radial_axis``; ``throughput`` gets change and archive
  events.  No other thread pushes events.
* ``Start`` returns at once: a starter thread builds (or reuses) the pyFAI
  integration set-up and then starts the Reducer; meanwhile the state is
  RUNNING with the status "preparing".  The set-up is cached across Starts as
  long as geometry, bins, mask and unit did not change.
* ``Stop`` asks the Reducer to drain (finish the frames already landed, close
  the file) and waits at most 0.5 s with the device monitor released
  (``AutoTangoAllowThreads``); if the drain takes longer the command returns
  anyway and the state goes RUNNING -> ON when the file is closed.
* Writes of geometry, bins, mask and unit while a scan is prepared or running
  are REFUSED with a DevFailed (reason ``XRDCT_Busy``): a change would silently
  not apply to the file being written.  ``scan_shape`` is refused as well;
  the sinogram bin selection is only a view and may change at any time.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import pyFAI.integrator.azimuthal  # noqa: F401,E402
import scipy.sparse  # noqa: F401,E402
import tango
from tango import AttrWriteType, DevState, DispLevel
from tango.server import Device, attribute, command, device_property

# The heavy imports (pyFAI, scipy, numba kernels) happen here, before the server answers: done
# lazily in Start's worker thread they would hold the GIL for seconds and delay Start's reply past
# the client time-out (seen: the client retried and the second Start found the file already there).
import pipeline.cpu_engine  # noqa: F401,E402
import pipeline.geometry  # noqa: F401,E402
import pipeline.runner  # noqa: F401,E402
from pipeline.config import MAX_BINS, UNITS, ConfigError, ReductionConfig, parse_poni, parse_scan_shape
from pipeline.paths import PathError, resolve_mask, resolve_under
from pipeline.scan import ScanError, ScanModel
from pipeline.source import DEFAULT_PATTERN, compile_pattern

logger = logging.getLogger(__name__)

PUBLISH_PERIOD = 0.2  # s: publisher cycle, so spectra events are at most 5 Hz
STOP_WAIT = 0.5  # s: how long Stop waits for the drain before returning (then ON comes by event)
MAX_SINO_CUBE = 512 * 1024 * 1024  # bytes kept for the live sinogram cube (rot x trans x bins float32)
COUNTERS = ("frames_processed", "frames_expected", "frames_missing", "frames_failed", "backlog", "latency")
CONFIG_ATTRS = ("geometry", "bins", "mask", "masked_pixels", "unit", "scan_shape", "output_file", "engine")
OUTPUT_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx5", ".hdf")  # any other name gets ".h5" appended
MAX_OUTPUT_NAME = 1024  # characters of an output name given to Start/Resume (each part at most 255 bytes)


class Unit(enum.IntEnum):
    """Radial unit; the labels seen by clients are pyFAI's unit names (see ``UNIT_LABELS``)."""

    q_nm = 0
    q_A = 1
    tth_deg = 2


UNIT_LABELS = list(UNITS)  # "q_nm^-1", "q_A^-1", "2th_deg", in Unit order


def _busy(what: str) -> None:
    tango.Except.throw_exception(
        "XRDCT_Busy",
        f"cannot change {what} while a scan is running: it would not apply to the file being written. "
        "Run Stop first (or wait for the scan to end), then write it again.",
        f"XRDCTReducer.write_{what}")


def _reject(what: str, exc: Exception) -> None:
    reason = "XRDCT_PathNotAllowed" if isinstance(exc, PathError) else "XRDCT_InvalidValue"
    tango.Except.throw_exception(reason, f"invalid {what}: {exc}", f"XRDCTReducer.write_{what}")


MEMORIZED = ("geometry", "bins", "mask", "unit", "scan_shape")


def _mask_stamp(mask_path: str | None) -> tuple:
    """Identity of the mask file's content (a file re-written in place must rebuild the set-up)."""
    if not mask_path:
        return ()
    try:
        st = Path(mask_path.split("::", 1)[0]).stat()
    except OSError:
        return ("unreadable",)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def setup_key(config: ReductionConfig) -> tuple:
    """What the integration set-up depends on (engine choice and workers do not matter)."""
    return (config.poni_text, config.mask_path, _mask_stamp(config.mask_path), config.bins, config.unit, config.split,
            config.polarization, config.solid_angle, config.dummy, config.delta_dummy, config.radial_range,
            config.error_model)


class SetupCache:
    """The last IntegrationSetup built, reused while its inputs do not change.  Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._setup = None
        self.builds = 0

    def get(self, config: ReductionConfig):
        from pipeline.geometry import build_setup

        key = setup_key(config)
        with self._lock:
            if self._key != key or self._setup is None:
                self._setup = None
                self._setup = build_setup(config)
                self._key = key
                self.builds += 1
            return self._setup

    def peek(self, config: ReductionConfig):
        with self._lock:
            return self._setup if self._key == setup_key(config) else None

    def clear(self) -> None:
        with self._lock:
            self._key = None
            self._setup = None


class XRDCTReducer(Device):
    """Live XRD-CT reduction: Pilatus CBF frames landing in a directory are decoded, azimuthally integrated
    (pyFAI-exact) and written into a NeXus file with a sinogram.

    States: ON idle and ready; RUNNING preparing/reducing/draining; ALARM reducing but falling behind the
    detector (backlog above BacklogAlarm); FAULT something failed, Status says what and how to recover
    (then Reset)."""

    # -- properties -------------------------------------------------------------------------------
    LandingDirectory = device_property(dtype=str, default_value="/tmp/xrdct/landing",
                                       doc="directory the detector writes CBF frames into")
    OutputDirectory = device_property(dtype=str, default_value="/tmp/xrdct/output",
                                      doc="the only directory where NeXus files are written")
    FilenamePattern = device_property(dtype=str, default_value=DEFAULT_PATTERN,
                                      doc=r"regex on frame file names with a (?P<frame>\d+) group")
    DefaultPoni = device_property(dtype=str, default_value="",
                                  doc="PONI file used when no geometry was written (memorized) yet")
    DefaultMask = device_property(dtype=str, default_value="",
                                  doc="mask file used when no mask was written (memorized) yet")
    MaskDirectories = device_property(
        dtype=(str,), default_value=[],
        doc="the only directories the mask attribute may name files in (symbolic links resolved; relative "
            "names are taken in the first). Empty: the directories of DefaultMask and DefaultPoni, and "
            "OutputDirectory")
    Engine = device_property(dtype=str, default_value="auto", doc="auto, cpu or opencl")
    OpenCLDevice = device_property(dtype=str, default_value="", doc="OpenCL device 'P:D' or part of its name")
    ScanShape = device_property(dtype=str, default_value="", doc="default scan shape NROTxNTRANS")
    MissingTimeout = device_property(dtype=float, default_value=5.0,
                                     doc="seconds before a frame that did not land is declared missing")
    Workers = device_property(dtype=int, default_value=0, doc="CPU engine threads (0: one per core)")
    BacklogAlarm = device_property(dtype=int, default_value=32,
                                   doc="backlog (frames landed, not yet reduced) above which the state is ALARM")
    LiveTomogramChannels = device_property(
        dtype=int, default_value=3,
        doc="strongest peaks back-projected while a scan runs into the file's entry/tomogram_live (0: off)")
    LiveTomogramInterval = device_property(dtype=float, default_value=2.0,
                                           doc="seconds between live tomogram updates in the file")

    def _live_tomogram_options(self) -> dict | None:
        channels = int(self.LiveTomogramChannels)
        if not 0 <= channels <= 16:
            raise ConfigError(f"LiveTomogramChannels property must lie in [0, 16], got {channels}")
        interval = float(self.LiveTomogramInterval)
        if not 0.1 <= interval <= 3600:
            raise ConfigError(f"LiveTomogramInterval property must lie in [0.1, 3600] s, got {interval}")
        return {"channels": channels, "interval": interval} if channels else None

    # -- life cycle -------------------------------------------------------------------------------
    def init_device(self):
        super().init_device()
        self._lock = threading.RLock()
        self._phase = "idle"  # idle | preparing | running | stopping | fault
        self._fault = ""
        self._info = ""
        self._reducer = None
        self._starter: threading.Thread | None = None
        self._cancel = threading.Event()
        self._quit = threading.Event()
        self._cache = getattr(self, "_cache", None) or SetupCache()  # survives Init within the process
        self._scan: ScanModel | None = None
        self._cube: np.ndarray | None = None
        self._result_seq = 0
        self._pattern: np.ndarray = np.zeros(0, np.float32)
        self._radial: np.ndarray = np.zeros(0, np.float64)
        self._output_file = ""
        self._last_summary = ""
        self._sino_start = 0
        self._sino_stop = -1
        self._bins = 1000
        self._unit = Unit.q_nm
        self._geometry = ""
        self._mask = ""
        self._masked_pixels = 0
        self._scan_shape = self.ScanShape
        self._restore_failed: dict[str, str] = {}  # memorized values Tango could not write back (Start refuses)
        self._restore_pending = self._memorized_in_db()  # Tango writes these back right after init_device
        notes = []
        if self.DefaultPoni:
            try:
                text = Path(self.DefaultPoni).read_text()
                parse_poni(text)
                self._geometry = text
            except (OSError, ConfigError) as exc:
                notes.append(f"DefaultPoni {self.DefaultPoni} unusable ({exc})")
        if self.DefaultMask:
            try:
                self._mask, self._masked_pixels = self._checked_mask(self.DefaultMask)
            except ConfigError as exc:
                notes.append(f"DefaultMask unusable ({exc})")
        if self._scan_shape:
            try:
                self._scan_shape = "{}x{}".format(*parse_scan_shape(self._scan_shape))
            except ConfigError as exc:
                notes.append(f"ScanShape property unusable ({exc})")
                self._scan_shape = ""
        self._info = "; ".join(notes)

        for name in ("State", "Status", *COUNTERS, *CONFIG_ATTRS, "last_pattern", "radial_axis"):
            self.set_change_event(name, True, False)
        for name in ("throughput", *COUNTERS):
            self.set_archive_event(name, True, False)
        self.set_change_event("throughput", True, False)
        self._pushed: dict[str, object] = {}
        self._pushed_seq = -1
        self.set_state(DevState.ON)
        self.set_status(self._status_text(DevState.ON))
        self._publisher = tango.utils.PyTangoThread(target=self._publish_loop, name="xrdct-publisher", daemon=True)
        self._publisher.start()

    def delete_device(self):
        """Init or shutdown in the middle of a scan: abort the Reducer (file closed), stop the threads."""
        self._cancel.set()
        self._quit.set()
        reducer = self._reducer
        try:
            with tango.AutoTangoAllowThreads(self):
                if reducer is not None:
                    reducer.abort(10)
                if self._starter is not None:
                    self._starter.join(10)
                    if self._reducer is not None and self._reducer is not reducer:
                        self._reducer.abort(10)
                self._publisher.join(5)
        except Exception:  # never block the shutdown
            logger.exception("delete_device")
        super().delete_device()

    # -- the model ------------------------------------------------------------------------------------
    def _config(self) -> ReductionConfig:
        return ReductionConfig(poni_text=self._geometry, mask_path=self._mask or None, bins=int(self._bins),
                               unit=UNIT_LABELS[int(self._unit)], engine=self.Engine or "auto",
                               opencl_device=self.OpenCLDevice or None, workers=int(self.Workers))

    def _busy_now(self) -> bool:
        return self._phase in ("preparing", "running", "stopping")

    def _refresh(self) -> None:
        """Follow the Reducer: done -> idle, fault -> fault."""
        with self._lock:
            r = self._reducer
            if self._phase in ("running", "stopping") and r is not None and not r.running:
                m = r.snapshot()
                if m.state == "fault":
                    self._set_fault(f"reduction failed: {m.message}",
                                    "check the OutputDirectory/LandingDirectory properties and the frames")
                else:
                    self._phase = "idle"
                    self._last_summary = m.message
            elif self._phase == "stopping" and r is None and (self._starter is None or not self._starter.is_alive()):
                self._phase = "idle"

    def _set_fault(self, what: str, hint: str) -> None:
        with self._lock:
            self._phase = "fault"
            self._fault = f"{what}. To recover: {hint}, then run Reset."
        logger.error(self._fault)

    def _snapshot(self):
        r = self._reducer
        return r.snapshot() if r is not None else None

    def _compute_state(self, m=None) -> DevState:
        self._refresh()
        phase = self._phase
        if phase == "fault":
            return DevState.FAULT
        if phase in ("preparing", "stopping"):
            return DevState.RUNNING
        if phase == "running":
            m = m if m is not None else self._snapshot()
            if m is not None and self.BacklogAlarm > 0 and m.backlog > self.BacklogAlarm:
                return DevState.ALARM
            return DevState.RUNNING
        return DevState.ON

    def _status_text(self, state: DevState, m=None) -> str:
        phase = self._phase
        m = m if m is not None else self._snapshot()
        if phase == "fault":
            return f"FAULT: {self._fault}"
        if phase == "preparing":
            return f"RUNNING: preparing the integrator (pyFAI set-up) for {Path(self._output_file).name}"
        if phase in ("running", "stopping") and m is not None:
            done = m.frames_processed + m.frames_missing + m.frames_failed
            text = (f"reducing {self.LandingDirectory} into {Path(self._output_file).name}: {done}/"
                    f"{m.frames_expected} frames, {m.throughput:.1f} fps")
            if m.state == "starting":
                text = f"starting the {self.Engine} engine for {Path(self._output_file).name}"
            if phase == "stopping":
                return f"RUNNING: stopping, finishing the frames already landed; {text}"
            if state == DevState.ALARM:
                return (f"ALARM: falling behind the detector, backlog {m.backlog} frames "
                        f"(limit {self.BacklogAlarm}); {text}")
            return f"RUNNING: {text}"
        text = "ON: idle, ready to Start."
        if not self._geometry:
            text = "ON: idle; no geometry yet: write the geometry attribute (PONI text) before Start."
        if self._last_summary:
            text += f" Last scan: {self._last_summary} -> {self._output_file}"
        if self._info:
            text += f" Note: {self._info}"
        for what, why in self._restore_failed.items():
            text += f" Note: the memorized {what} could not be restored ({why}); write {what} again before Start."
        return text

    def dev_state(self):
        state = self._compute_state()
        self.set_state(state)
        return state

    def dev_status(self):
        text = self._status_text(self._compute_state())
        self.set_status(text)
        return text

    # -- publisher (the only thread pushing events) ------------------------------------------------
    def _publish_loop(self):
        while not self._quit.wait(PUBLISH_PERIOD):
            try:
                self._publish_once()
            except Exception:  # keep publishing; a failed push is logged
                logger.exception("event publisher")

    def _push(self, name: str, value, archive: bool = False) -> None:
        if isinstance(value, float) and self._pushed.get(name) is not None:
            old = self._pushed[name]
            if abs(old - value) <= 1e-3 * max(1.0, abs(old)):
                return
        elif self._pushed.get(name, object()) == value:
            return
        self._pushed[name] = value
        self.push_change_event(name, value)
        if archive:
            self.push_archive_event(name, value)

    def _publish_once(self):
        m = self._snapshot()  # one snapshot: State, Status and counters of a cycle agree
        state = self._compute_state(m)
        self.set_state(state)
        status = self._status_text(state, m)
        self.set_status(status)
        self._push("State", state)
        self._push("Status", status)
        values = self._values(m)
        for name in COUNTERS:
            self._push(name, values[name], archive=True)
        self._push("throughput", values["throughput"], archive=True)
        for name in CONFIG_ATTRS:
            self._push(name, values[name])
        seq = self._result_seq
        if seq != self._pushed_seq:
            self._pushed_seq = seq
            with self._lock:
                pattern, radial = self._pattern, self._radial
            self.push_change_event("last_pattern", pattern)
            if self._pushed.get("radial_axis_id") != id(radial):
                self._pushed["radial_axis_id"] = id(radial)
                self.push_change_event("radial_axis", radial)

    def _values(self, m=None) -> dict:
        m = m if m is not None else self._snapshot()
        out = {name: (getattr(m, name) if m is not None else 0) for name in COUNTERS}
        out["latency"] = float(out["latency"])
        out["throughput"] = float(m.throughput) if m is not None and self._busy_now() else 0.0
        out.update(geometry=self._geometry, bins=int(self._bins), mask=self._mask,
                   masked_pixels=int(self._masked_pixels), unit=int(self._unit), scan_shape=self._scan_shape,
                   output_file=self._output_file, engine=self._engine_text(m))
        return out

    def _engine_text(self, m) -> str:
        if m is not None and m.engine:
            return m.engine
        wanted = self.Engine or "auto"
        if self.OpenCLDevice:
            wanted += f" (OpenCL device {self.OpenCLDevice})"
        return f"{wanted}: not started"

    # -- reducer callbacks (pipeline threads; no Tango calls here) --------------------------------
    def _on_result(self, frame: int, result) -> None:
        intensity = np.asarray(result.intensity, dtype=np.float32)
        with self._lock:
            cube, scan = self._cube, self._scan
            if cube is not None and scan is not None:
                try:
                    rot, trans = scan.position(frame)
                    cube[rot, trans, :] = intensity
                except (KeyError, IndexError, ValueError):
                    pass
            self._pattern = intensity.copy()
            self._result_seq += 1

    # -- validation -----------------------------------------------------------------------------------
    def _memorized_in_db(self) -> set[str]:
        """The memorized attributes with a value in the database: Tango writes each back once after init_device
        (at start-up and after Init), before any client call, so the next write of each is that restore."""
        try:
            util = tango.Util.instance()
            if not util._UseDb:  # DeviceTestContext, -nodb: no memorized values
                return set()
            stored = util.get_database().get_device_attribute_property(self.get_name(), list(MEMORIZED))
            return {name for name, values in stored.items() if values.get("__value") not in (None, [], [""])}
        except Exception:  # no database reachable: nothing will be restored either
            logger.exception("reading the memorized values")
            return set()

    def _reject(self, what: str, exc: Exception) -> None:
        """Refuse a written value (DevFailed).  A memorized value refused while Tango restores it is remembered:
        Status says so and Start refuses until the attribute is written again (no scan silently without its mask)."""
        if what in self._restore_pending:
            self._restore_pending.discard(what)
            self._restore_failed[what] = str(exc)
            logger.error("memorized %s not restored: %s", what, exc)
        _reject(what, exc)

    def _accepted(self, what: str) -> None:
        self._restore_pending.discard(what)
        self._restore_failed.pop(what, None)

    # -- attributes: configuration ------------------------------------------------------------------
    @attribute(dtype=str, access=AttrWriteType.READ_WRITE, memorized=True, hw_memorized=True,
               label="Geometry (PONI)", unit="", format="%s",
               doc="pyFAI calibration as PONI text (the content of a .poni file, not its path). Validated strictly; "
                   "refused while a scan runs.")
    def geometry(self) -> str:
        return self._geometry

    @geometry.write
    def geometry(self, value: str) -> None:
        if self._busy_now():
            _busy("geometry")
        from pipeline.geometry import make_integrator

        try:
            parse_poni(value)
            make_integrator(value)  # pyFAI accepts it too (detector known, numbers usable)
        except ConfigError as exc:
            self._reject("geometry", exc)
        self._geometry = value
        self._accepted("geometry")

    @attribute(dtype=int, access=AttrWriteType.READ_WRITE, memorized=True, hw_memorized=True,
               label="Radial bins", unit="", format="%d", min_value=1, max_value=MAX_BINS,
               doc="number of radial bins of the integrated patterns (1..100000); refused while a scan runs")
    def bins(self) -> int:
        return int(self._bins)

    @bins.write
    def bins(self, value: int) -> None:
        if self._busy_now():
            _busy("bins")
        if isinstance(value, bool) or int(value) != value or not 1 <= int(value) <= MAX_BINS:
            self._reject("bins", ValueError(f"must be an integer in 1..{MAX_BINS}, got {value}"))
        self._bins = int(value)
        self._accepted("bins")

    @attribute(dtype=str, access=AttrWriteType.READ_WRITE, memorized=True, hw_memorized=True,
               label="Mask file", unit="", format="%s",
               doc="path of the mask file (EDF, TIFF, NPY or file.h5::/path; non-zero = masked), on the server's "
                   "file system, inside the MaskDirectories property (relative: to its first entry); reads back "
                   "as the real path used; empty = detector gaps only. Refused while a scan runs.")
    def mask(self) -> str:
        return self._mask

    @mask.write
    def mask(self, value: str) -> None:
        if self._busy_now():
            _busy("mask")
        value = value.strip()
        spec, count = "", 0
        if value:
            try:
                spec, count = self._checked_mask(value)
            except ConfigError as exc:
                self._reject("mask", exc)
        self._mask, self._masked_pixels = spec, count
        self._accepted("mask")
        if spec != value:  # memorize the real path, not a relative name or a link that may change meaning
            self.get_device_attr().get_w_attr_by_name("mask").set_write_value(spec)

    def _mask_dirs(self) -> list[str]:
        """MaskDirectories, or by default the directories of DefaultMask and DefaultPoni and OutputDirectory."""
        dirs = [d for d in (self.MaskDirectories or []) if d.strip()]
        if not dirs:
            dirs = [str(Path(p.split("::", 1)[0]).parent) for p in (self.DefaultMask, self.DefaultPoni) if p]
            dirs.append(self.OutputDirectory)
        return dirs

    def _checked_mask(self, value: str) -> tuple[str, int]:
        """(real path of the mask confined to the mask directories, masked pixel count); ConfigError if unusable."""
        from pipeline.geometry import load_mask

        spec = resolve_mask(self._mask_dirs(), value)
        return spec, int(np.count_nonzero(load_mask(spec)))

    @attribute(dtype=int, label="Masked pixels (mask file)", unit="px", format="%d",
               doc="number of pixels masked by the mask file (detector gaps not included); 0 without a mask")
    def masked_pixels(self) -> int:
        return int(self._masked_pixels)

    @attribute(dtype="DevEnum", enum_labels=UNIT_LABELS, access=AttrWriteType.READ_WRITE, memorized=True,
               hw_memorized=True, label="Radial unit", doc="radial unit of the patterns: q in nm^-1, q in A^-1 or "
               "2theta in degrees; refused while a scan runs")
    def unit(self) -> int:
        return int(self._unit)

    @unit.write
    def unit(self, value: int) -> None:
        if self._busy_now():
            _busy("unit")
        try:
            self._unit = Unit(int(value))
        except ValueError as exc:
            self._reject("unit", exc)
        self._accepted("unit")

    @attribute(dtype=str, access=AttrWriteType.READ_WRITE, memorized=True, hw_memorized=True,
               label="Scan shape", unit="", format="%s",
               doc="NROTxNTRANS, e.g. 180x100 (row order, translation fastest, first frame 0); default from the "
                   "ScanShape property; refused while a scan runs")
    def scan_shape(self) -> str:
        return self._scan_shape

    @scan_shape.write
    def scan_shape(self, value: str) -> None:
        if self._busy_now():
            _busy("scan_shape")
        try:
            rot, trans = parse_scan_shape(value)
        except ConfigError as exc:
            self._reject("scan_shape", exc)
        self._scan_shape = f"{rot}x{trans}"
        self._accepted("scan_shape")

    @attribute(dtype=str, label="Landing directory", doc="where the frames land (property LandingDirectory)")
    def landing_directory(self) -> str:
        return self.LandingDirectory

    # -- attributes: live values ---------------------------------------------------------------------
    @attribute(dtype=float, label="Throughput", unit="frames/s", format="%7.1f", min_value=0.0,
               doc="frames reduced per second over the last 2 s (change and archive events pushed)")
    def throughput(self) -> float:
        return self._values()["throughput"]

    @attribute(dtype=int, label="Frames processed", unit="frames", format="%d",
               doc="frames reduced and written in the current (or last) scan")
    def frames_processed(self) -> int:
        return int(self._values()["frames_processed"])

    @attribute(dtype=int, label="Frames expected", unit="frames", format="%d",
               doc="frames of the current (or last) scan")
    def frames_expected(self) -> int:
        return int(self._values()["frames_expected"])

    @attribute(dtype=int, label="Frames missing", unit="frames", format="%d",
               doc="frames that never landed within MissingTimeout (recorded as missing in the file)")
    def frames_missing(self) -> int:
        return int(self._values()["frames_missing"])

    @attribute(dtype=int, label="Frames failed", unit="frames", format="%d",
               doc="frames that landed but could not be decoded or integrated")
    def frames_failed(self) -> int:
        return int(self._values()["frames_failed"])

    @attribute(dtype=int, label="Backlog", unit="frames", format="%d", min_value=0,
               doc="frames landed but not yet reduced; above the BacklogAlarm property the state is ALARM")
    def backlog(self) -> int:
        return int(self._values()["backlog"])

    @attribute(dtype=float, label="Latency", unit="s", format="%6.3f", min_value=0.0,
               doc="median time from a frame landing (seen complete) to its pattern written")
    def latency(self) -> float:
        return float(self._values()["latency"])

    @attribute(dtype=(np.float32,), max_dim_x=MAX_BINS, label="Last pattern", unit="a.u.", format="%.4g",
               doc="azimuthally integrated intensity of the last frame reduced (events at most 5 Hz)")
    def last_pattern(self):
        with self._lock:
            return self._pattern

    @attribute(dtype=(np.float64,), max_dim_x=MAX_BINS, label="Radial axis", format="%.5g",
               doc="bin centres of last_pattern in the radial unit (unit attribute)")
    def radial_axis(self):
        with self._lock:
            return self._radial

    @attribute(dtype=((np.float32,),), max_dim_x=16384, max_dim_y=16384, label="Sinogram", unit="a.u.",
               format="%.4g", doc="live sinogram [rotation, translation] of the mean intensity over the bins "
               "sinogram_bin_start..sinogram_bin_stop-1 (NaN: not reduced yet)")
    def sinogram(self):
        return self._sinogram_image()

    def _sinogram_image(self) -> np.ndarray:
        with self._lock:
            cube = self._cube
            if cube is None:
                return np.zeros((0, 0), np.float32)
            nb = cube.shape[2]
            a = min(max(self._sino_start, 0), nb - 1)
            b = self._sino_stop if self._sino_stop > a else a + 1
            b = min(b, nb)
            sl = cube[:, :, a:b]
            if b - a == 1:
                return np.ascontiguousarray(sl[:, :, 0])
            with np.errstate(invalid="ignore"):
                return sl.mean(axis=2).astype(np.float32)

    @attribute(dtype=((np.float32,),), max_dim_x=16384, max_dim_y=16384, label="Tomogram", unit="a.u.",
               format="%.4g", doc="live filtered back-projection [y, x] of the sinogram attribute (same bins), "
               "from the rotations reduced so far (0-180 degrees); recomputed at most twice a second")
    def tomogram(self):
        from pipeline.tomo import reconstruct

        sino = self._sinogram_image()
        key = (sino.shape, self._sino_start, self._sino_stop, int(np.isfinite(sino).sum()))
        cached = getattr(self, "_tomo_cache", None)
        if cached is not None and cached[0] == key and time.monotonic() - cached[1] < 0.5:
            return cached[2]
        image = np.zeros((0, 0), np.float32)
        if sino.size and np.isfinite(sino).any():
            try:
                image = reconstruct(sino, engine="cpu").images[0].astype(np.float32)
            except ValueError:  # no rotation measured well enough yet
                pass
        self._tomo_cache = (key, time.monotonic(), image)
        return image

    @attribute(dtype=int, access=AttrWriteType.READ_WRITE, label="Sinogram first bin", format="%d", min_value=0,
               max_value=MAX_BINS - 1, doc="first radial bin (0-based) averaged into the sinogram attribute")
    def sinogram_bin_start(self) -> int:
        return self._sino_start

    @sinogram_bin_start.write
    def sinogram_bin_start(self, value: int) -> None:
        nb = self._sino_bins()
        if not 0 <= int(value) < nb:
            self._reject("sinogram_bin_start", ValueError(f"must lie in 0..{nb - 1} (the pattern bins), got {value}"))
        self._sino_start = int(value)

    def _sino_bins(self) -> int:
        """Bins of the live sinogram cube, or of the configuration when there is none."""
        cube = self._cube
        return int(cube.shape[2]) if cube is not None else int(self._bins)

    @attribute(dtype=int, access=AttrWriteType.READ_WRITE, label="Sinogram end bin", format="%d", min_value=-1,
               max_value=MAX_BINS, doc="end bin (exclusive) of the sinogram average; -1 or <= start: one bin only")
    def sinogram_bin_stop(self) -> int:
        return self._sino_stop

    @sinogram_bin_stop.write
    def sinogram_bin_stop(self, value: int) -> None:
        nb = self._sino_bins()
        if not -1 <= int(value) <= nb:
            self._reject("sinogram_bin_stop", ValueError(f"must lie in -1..{nb} (end bin, exclusive), got {value}"))
        self._sino_stop = int(value)

    @attribute(dtype=str, label="Output file", doc="NeXus file of the current (or last) scan")
    def output_file(self) -> str:
        return self._output_file

    @attribute(dtype=str, label="Engine", doc="engine and device running now (or configured, when idle)")
    def engine(self) -> str:
        return self._values()["engine"]

    @attribute(dtype=int, label="Setup builds", display_level=DispLevel.EXPERT, format="%d",
               doc="how many times the pyFAI integration set-up was built by this server (cache diagnostics)")
    def setup_builds(self) -> int:
        return self._cache.builds

    # -- commands ------------------------------------------------------------------------------------
    def is_Start_allowed(self) -> bool:
        return self._compute_state() == DevState.ON

    @command(dtype_in=str, doc_in="output file name relative to OutputDirectory, or an absolute path inside it "
             "('' = auto-named with a timestamp; '.h5' is appended unless it ends in .h5/.hdf5/.nxs/.nx5/.hdf)",
             dtype_out=str, doc_out="absolute path of the NeXus file that will be written")
    def Start(self, name: str) -> str:
        """Begin a scan: watch the landing directory and reduce into a new file.  Returns at once."""
        return self._begin(name, resume=False)

    def is_Resume_allowed(self) -> bool:
        return self._compute_state() == DevState.ON

    @command(dtype_in=str, doc_in="name (relative to OutputDirectory, or an absolute path inside it) of the file "
             "of an interrupted scan",
             dtype_out=str, doc_out="absolute path of the NeXus file that will be written")
    def Resume(self, name: str) -> str:
        """Continue an interrupted scan (after a Stop, a crash or a full disk): the frames its file holds are
        kept (the file is moved aside as NAME.interrupted-N.h5), only the others are reduced.  Returns at once."""
        return self._begin(name, resume=True)

    def _begin(self, name: str, resume: bool) -> str:
        config = self._config()
        try:
            if self._restore_failed:
                what = ", ".join(self._restore_failed)
                raise ConfigError(f"the memorized {what} could not be restored at start-up "
                                  f"({'; '.join(self._restore_failed.values())}): write {what} again first")
            if not self._geometry:
                raise ConfigError("no geometry: write the geometry attribute (PONI text) first")
            if config.mask_path:  # checked again: a link on its way may have changed since it was written
                config.mask_path = resolve_mask(self._mask_dirs(), config.mask_path)
            config.validate()
            if not self._scan_shape:
                raise ScanError("no scan shape: write scan_shape (NROTxNTRANS) first")
            scan = ScanModel.parse(self._scan_shape)
            compile_pattern(self.FilenamePattern)
            timeout = float(self.MissingTimeout)
            if not 0 < timeout <= 86400:
                raise ConfigError(f"MissingTimeout property must lie in (0, 86400] s, got {self.MissingTimeout}")
            output = self._output_path(name, resume=resume)
        except ValueError as exc:
            reason = "XRDCT_PathNotAllowed" if isinstance(exc, PathError) else "XRDCT_CannotStart"
            tango.Except.throw_exception(reason, f"cannot start: {exc}", "XRDCTReducer.Start")
        nbins = int(config.bins)
        with self._lock:
            self._phase = "preparing"
            self._cancel.clear()
            self._reducer = None
            self._output_file = str(output)
            self._last_summary = ""
            self._scan = scan
            cube_bytes = scan.rotations * scan.translations * nbins * 4
            self._cube = (np.full((scan.rotations, scan.translations, nbins), np.nan, np.float32)
                          if cube_bytes <= MAX_SINO_CUBE else None)
            self._pattern = np.zeros(0, np.float32)
            self._result_seq += 1
        self._starter = threading.Thread(target=self._start_worker, args=(config, scan, output, resume),
                                         name="xrdct-starter", daemon=True)
        self._starter.start()
        return str(output)

    def _output_path(self, name: str, resume: bool = False) -> Path:
        """The file a Start/Resume name means: inside OutputDirectory (links resolved), a NeXus suffix, new."""
        root = self.OutputDirectory
        name = (name or "").strip()
        if not name:
            stamp = time.strftime("%Y%m%d_%H%M%S")
            name = f"xrdct_{stamp}.h5"
            i = 1
            while (Path(root) / name).exists():
                name = f"xrdct_{stamp}_{i}.h5"
                i += 1
        if len(name) > MAX_OUTPUT_NAME or any(len(part.encode()) > 255 for part in name.split("/")):
            raise ValueError(f"output name longer than {MAX_OUTPUT_NAME} characters or with a part longer than 255")
        if not re.fullmatch(r"[\w.\-/ +=,@]+", name):
            raise ValueError(f"output name {name!r} has unusual characters (letters, digits, . - / _ space + = , @)")
        if Path(name).suffix.lower() not in OUTPUT_SUFFIXES:
            name += ".h5"
        try:
            path = resolve_under([root], name, "output file")
        except PathError as exc:
            raise PathError(f"{exc} (the OutputDirectory property)") from None
        if resume and not path.is_file():
            raise ValueError(f"{path} does not exist: nothing to resume")
        if path.exists() and not resume:
            raise ValueError(f"{path} exists already; previous results are never overwritten (Resume continues it)")
        return path

    def _start_worker(self, config: ReductionConfig, scan: ScanModel, output: Path, resume: bool = False) -> None:
        """Starter thread: directories, set-up (cached), then the Reducer.  Failures -> FAULT."""
        from pipeline.runner import Reducer

        try:
            landing = Path(self.LandingDirectory)
            if not landing.is_dir():
                raise NotADirectoryError(f"landing directory {landing} is not a directory")
            output.parent.mkdir(parents=True, exist_ok=True)
            live_tomogram = self._live_tomogram_options()
            setup = self._cache.get(config)
        except Exception as exc:  # reported as FAULT with the reason
            hint = ("fix the LandingDirectory/OutputDirectory properties (then Init) or the geometry/mask"
                    if isinstance(exc, OSError) else "correct geometry, bins, mask or unit")
            self._set_fault(f"cannot prepare the scan: {type(exc).__name__}: {exc}", hint)
            return
        with self._lock:
            if self._cancel.is_set():
                self._phase = "idle"
                self._last_summary = "stopped before the first frame"
                return
            self._radial = np.asarray(setup.radial, dtype=np.float64)
            reducer = Reducer(config, landing, output, scan=scan, pattern=self.FilenamePattern, live=True,
                              missing_timeout=float(self.MissingTimeout), setup=setup, on_result=self._on_result,
                              resume=resume, live_tomogram=live_tomogram)
            self._reducer = reducer
            self._phase = "running"
            reducer.start()

    def is_Stop_allowed(self) -> bool:
        return self._compute_state() in (DevState.RUNNING, DevState.ALARM)

    @command
    def Stop(self) -> None:
        """Finish the frames already landed, flush and close the file.  Returns within ~0.5 s; if the drain takes
        longer, the state goes from RUNNING to ON once the file is closed."""
        with self._lock:
            self._cancel.set()
            if self._phase in ("preparing", "running"):
                self._phase = "stopping"
            reducer = self._reducer
        deadline = time.monotonic() + STOP_WAIT
        with tango.AutoTangoAllowThreads(self):
            if reducer is not None:
                reducer.stop(timeout=STOP_WAIT)
            else:
                starter = self._starter
                if starter is not None:
                    starter.join(max(0.0, deadline - time.monotonic()))
                if self._reducer is not None:  # the starter won the race
                    self._reducer.stop(timeout=max(0.0, deadline - time.monotonic()))
        self._refresh()

    def is_Reset_allowed(self) -> bool:
        return self._compute_state() in (DevState.ON, DevState.FAULT)

    @command
    def Reset(self) -> None:
        """Clear the counters and a FAULT, and rebuild the pipeline set-up (in the background)."""
        with self._lock:
            self._phase = "idle"
            self._fault = ""
            self._reducer = None
            self._scan = None
            self._cube = None
            self._pattern = np.zeros(0, np.float32)
            self._radial = np.zeros(0, np.float64)
            self._result_seq += 1
            self._output_file = ""
            self._last_summary = ""
        self._cache.clear()
        config = self._config()
        if self._geometry:
            threading.Thread(target=self._prewarm, args=(config,), name="xrdct-prewarm", daemon=True).start()

    def _prewarm(self, config: ReductionConfig) -> None:
        try:
            self._cache.get(config)
        except Exception as exc:
            self._set_fault(f"cannot rebuild the pipeline set-up: {exc}", "correct geometry, bins, mask or unit")
