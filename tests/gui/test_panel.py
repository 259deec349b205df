"""The Taurus panel (``xrdct panel``) headless (Qt offscreen) against a real running XRDCTReducer."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("taurus")
pytest.importorskip("taurus_pyqtgraph")
pytest.importorskip("pytestqt")

import tango  # noqa: E402
from gui_support import BINS, ROT, TEST_OUTPUT, TRANS, configure, wait_for  # noqa: E402

from pipeline.simulate import Player  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.tango, pytest.mark.leaves_threads, pytest.mark.timeout(180)]

ON, RUNNING = tango.DevState.ON, tango.DevState.RUNNING
WAIT_MS = 60_000


def _form_text(form, attr: str) -> str:
    """The read-widget text of ``attr`` in a TaurusForm."""
    for item in form.getItems():
        if item.getModelName().rsplit("/", 1)[-1].lower() == attr.lower():
            widget = item.readWidget()
            return widget.text() if hasattr(widget, "text") else ""
    raise KeyError(attr)


def _curve(panel):
    items = panel.pattern_plot.getPlotItem().listDataItems()
    assert len(items) == 1
    return items[0]


def _trend_points(panel) -> int:
    from taurus_pyqtgraph.taurustrendset import TaurusTrendSet

    sets = [i for i in panel.throughput_trend.getPlotItem().items if isinstance(i, TaurusTrendSet)]
    assert len(sets) == 1
    return 0 if sets[0]._yBuffer is None else len(sets[0]._yBuffer.contents())


def test_panel_follows_a_scan_and_drives_the_device(qtbot, reducer, sim_scan, tmp_path):
    from taurus.external.qt import Qt

    from tango_ds.panel import build_panel

    dev, name, landing, output = reducer
    configure(dev, sim_scan)

    panel = build_panel(name)
    qtbot.addWidget(panel)
    panel.show()
    qtbot.waitExposed(panel)

    # all docked, none floating, every dock visible
    assert set(panel.docks) == {"Control", "Counters", "Settings", "Sinogram", "Throughput"}
    assert all(not d.isFloating() and d.isVisible() for d in panel.docks.values())

    # connected: values of the device appear in the widgets
    qtbot.waitUntil(lambda: panel.state_label.text() == "ON", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: "idle" in panel.status_label.text(), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: _form_text(panel.settings_form, "bins") == str(BINS), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: _form_text(panel.settings_form, "scan_shape") == f"{ROT}x{TRANS}", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: panel.counter_labels["frames_processed"].text() == "0", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: str(landing) in panel.counter_labels["landing_directory"].text(), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: panel.geometry_edit.toPlainText() == sim_scan.poni_text, timeout=WAIT_MS)

    # the Start button reaches the device (with the output name typed in the panel)
    panel.output_name.setText("gui_scan")
    qtbot.mouseClick(panel.start_button, Qt.Qt.LeftButton)
    wait_for(lambda: dev.state() == RUNNING, timeout=10)
    assert dev.output_file == str(output / "gui_scan.h5")
    qtbot.waitUntil(lambda: panel.state_label.text() == "RUNNING", timeout=WAIT_MS)

    # reduce a whole simulated scan: the pattern plot, counters and the sinogram follow
    qtbot.waitUntil(lambda: "preparing" not in dev.status(), timeout=WAIT_MS)
    Player(sim_scan, landing, rate=0).run()
    qtbot.waitUntil(lambda: dev.state() == ON, timeout=WAIT_MS)
    n = ROT * TRANS
    qtbot.waitUntil(lambda: panel.counter_labels["frames_processed"].text() == str(n), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: panel.state_label.text() == "ON", timeout=WAIT_MS)

    def plotted():
        x, y = _curve(panel).getData()
        return x is not None and y is not None and len(x) == BINS and len(y) == BINS

    qtbot.waitUntil(plotted, timeout=WAIT_MS)
    x, y = _curve(panel).getData()
    np.testing.assert_allclose(x, dev.radial_axis)
    np.testing.assert_allclose(y, dev.last_pattern)
    assert np.all(np.diff(x) > 0) and np.nanmax(y) > 0
    assert "nm" in panel.pattern_plot.getPlotItem().getAxis("bottom").labelText  # unit q_nm^-1
    qtbot.waitUntil(lambda: panel.sinogram_item.image is not None
                    and panel.sinogram_item.image.shape == (ROT, TRANS), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: _trend_points(panel) >= 2, timeout=WAIT_MS)  # throughput events were trended

    qtbot.wait(500)  # let the last repaint happen
    shot = tmp_path / "panel.png"
    assert panel.grab().save(str(shot))
    assert shot.stat().st_size > 10_000
    TEST_OUTPUT.mkdir(exist_ok=True)
    shutil.copy(shot, TEST_OUTPUT / "panel.png")

    # Start then Stop by button: the state changes on the device and in the panel.  The landing
    # directory is emptied first, so the second scan waits for frames (it would otherwise finish at once
    # on the frames of the first one, and Stop would be refused in state ON).
    for old in landing.iterdir():
        old.unlink()
    panel.output_name.setText("gui_scan_2")
    qtbot.mouseClick(panel.start_button, Qt.Qt.LeftButton)
    wait_for(lambda: dev.state() == RUNNING, timeout=10)
    qtbot.waitUntil(lambda: panel.state_label.text() == "RUNNING", timeout=WAIT_MS)
    qtbot.mouseClick(panel.stop_button, Qt.Qt.LeftButton)
    wait_for(lambda: dev.state() == ON, timeout=30)
    qtbot.waitUntil(lambda: panel.state_label.text() == "ON", timeout=WAIT_MS)
    assert dev.output_file == str(output / "gui_scan_2.h5")

    panel.close()
