"""The Sardana macro library: it loads in a core MacroServer, and its logic drives a real XRDCTReducer."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

pytest.importorskip("tango")
import tango  # noqa: E402
from macro_support import MACRO_DIR, ROT, TRANS, FastWriter, configure, props, wait_for  # noqa: E402

from pipeline.simulate import Player  # noqa: E402

pytestmark = [pytest.mark.macros, pytest.mark.timeout(180)]

ON, RUNNING = tango.DevState.ON, tango.DevState.RUNNING
MACROS = {"xrdct_start", "xrdct_stop", "xrdct_wait", "xrdct_status", "xrdct_pre_scan", "xrdct_post_scan"}


@pytest.mark.leaves_threads(order=1)
def test_macro_library_loads_in_a_macroserver():
    pytest.importorskip("sardana")
    from sardana.macroserver.macroserver import MacroServer

    ms = MacroServer("xrdct_test")
    ms.set_macro_path([str(MACRO_DIR)])
    lib = ms.get_macro_lib("xrdct_macros")
    assert not lib.has_errors(), lib.get_error()
    assert {m.name for m in lib.get_macros()} == MACROS
    assert "_xrdct_macro_logic" not in {name for name in ms.get_macro_libs()}  # helper, not a library
    wait = ms.get_macro("xrdct_wait")
    assert [p["name"] for p in wait.get_parameter()] == ["nframes", "timeout"]
    start = ms.get_macro("xrdct_start")
    assert [p["default_value"] for p in start.get_parameter()] == ["", ""]


def test_logic_imports_without_tango_or_sardana():
    code = ("import sys; sys.modules['tango'] = None; sys.modules['sardana'] = None; "
            f"sys.path.insert(0, {str(MACRO_DIR)!r}); import _xrdct_macro_logic as m; "
            "print(m.hook_output_name('scan_', 7))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "scan_00007.h5"


def _reduction(dev, log):
    from _xrdct_macro_logic import Reduction

    return Reduction(dev, log=log.append, period=0.05)


def test_start_wait_status_stop_on_a_real_device(make_device, dirs, sim_scan):
    from _xrdct_macro_logic import XRDCTError

    landing, output = dirs
    dev = make_device(props(landing, output))
    log: list[str] = []
    red = _reduction(dev, log)

    # device errors reach the user as readable messages
    with pytest.raises(XRDCTError, match="Start failed: XRDCT_CannotStart: cannot start: no geometry"):
        red.start("too_early")
    with pytest.raises(XRDCTError, match="NROTxNTRANS"):
        red.start("bad_shape", "12")

    configure(dev, sim_scan, scan="1x1")
    path = red.start("macro_scan", f"{ROT}x{TRANS}")
    assert path == str(output / "macro_scan.h5")
    assert dev.scan_shape == f"{ROT}x{TRANS}" and dev.state() == RUNNING
    with pytest.raises(XRDCTError, match="already RUNNING"):
        red.start("second")
    wait_for(lambda: "preparing" not in dev.status())
    player = Player(sim_scan, landing, rate=0)
    player.start()
    seen: list[tuple[int, int]] = []
    assert red.wait_frames(ROT * TRANS, timeout=60, check=lambda: None,
                           progress=lambda d, n: seen.append((d, n))) == ROT * TRANS
    player.join(10)
    assert seen[-1] == (ROT * TRANS, ROT * TRANS)
    wait_for(lambda: dev.state() == ON, timeout=30)
    text = red.status()
    assert "ON" in text and f"{ROT * TRANS} reduced of {ROT * TRANS} expected" in text and "macro_scan.h5" in text
    assert red.stop() == "ON"  # not running: nothing to do
    # waiting for more frames than the scan has: a readable error, not a hang
    with pytest.raises(XRDCTError, match="reduction ended"):
        red.wait_frames(ROT * TRANS + 1, timeout=10)


def test_abort_in_the_middle_of_a_wait_leaves_the_device_stopped(make_device, dirs, sim_scan):
    sardana_exc = pytest.importorskip("sardana.sardanaexception")
    landing, output = dirs
    dev = make_device(props(landing, output))
    configure(dev, sim_scan, scan="10x20")
    log: list[str] = []
    red = _reduction(dev, log)
    path = red.start("aborted_scan")
    wait_for(lambda: "preparing" not in dev.status() and "starting" not in dev.status())
    writer = FastWriter(sim_scan, landing, 60)
    writer.start()

    # the Door's abort, as Sardana does it: a flag set from another thread, raised by the next checkPoint
    aborted = threading.Event()

    def check_point():
        if aborted.is_set():
            raise sardana_exc.AbortException("aborted by the user")

    def user_aborts():
        wait_for(lambda: dev.frames_processed >= 3, timeout=60, period=0.02)
        aborted.set()

    threading.Thread(target=user_aborts, daemon=True).start()
    with pytest.raises(sardana_exc.AbortException):
        red.wait_frames(200, timeout=120, check=check_point)
    writer.stop_event.set()
    writer.join(10)
    assert dev.state() == ON  # stopped (and the file closed) before the abort propagated
    assert 3 <= dev.frames_processed < 200
    assert any("interrupted" in line for line in log)
    assert dev.output_file == path


class _FakeMacro:
    """Enough of a Sardana Macro to run the macro classes' methods (the glue) without a Door."""

    def __init__(self, macros, dev, env):
        self._red_dev, self.env, self.lines = dev, env, []
        self._env = macros._XRDCTMacro._env.__get__(self)
        self._fail = macros._XRDCTMacro._fail.__get__(self)

    def getEnv(self, name):
        if name not in self.env:
            raise KeyError(name)
        return self.env[name]

    def output(self, text):
        self.lines.append(text)

    def checkPoint(self):
        pass

    def _reduction(self):
        from _xrdct_macro_logic import Reduction

        return Reduction(self._red_dev, log=self.output, period=0.05)


@pytest.mark.leaves_threads(order=0)  # its device is forked before its MacroServer starts threads
def test_hook_macros_start_and_stop_around_a_scan(make_device, dirs, sim_scan):
    pytest.importorskip("sardana")
    from sardana.macroserver.macroserver import MacroServer

    landing, output = dirs
    dev = make_device(props(landing, output))
    MacroServer("xrdct_hooks").set_macro_path([str(MACRO_DIR)])  # registers the parameter types
    import xrdct_macros as macros

    configure(dev, sim_scan, scan="1x1")
    fake = _FakeMacro(macros, dev, {"ScanID": 42, "XRDCTScanShape": "10x20"})
    macros.xrdct_pre_scan.run(fake)
    assert dev.state() == RUNNING and dev.output_file == str(output / "scan_00042.h5")
    assert dev.scan_shape == "10x20"
    with pytest.raises(Exception, match="already RUNNING") as info:  # a plain, readable macro error
        macros.xrdct_start.run(fake, "other", "")
    assert type(info.value) is Exception
    macros.xrdct_post_scan.run(fake)
    assert dev.state() == ON
    macros.xrdct_status.run(fake)
    assert "scan_00042.h5" in fake.lines[-1]
