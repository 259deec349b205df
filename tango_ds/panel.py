"""``xrdct panel DEVICE``: a Taurus operator panel for the XRDCTReducer device.

One main window, built in code (no saved layout needed, nothing floats):

* centre: the live ``last_pattern`` against ``radial_axis`` (taurus_pyqtgraph ``TaurusPlot``), x label from ``unit``;
* left docks: *Control* (State, Status, output name, Start/Stop/Reset ``TaurusCommandButton``), *Counters*
  (processed/expected/missing/failed/backlog/latency/throughput, output file, engine) and *Settings* (an editor for
  the PONI ``geometry`` text, and a ``TaurusForm`` for bins, mask, unit, scan shape and the sinogram bin range);
* right docks: the ``sinogram`` image and a ``throughput`` trend.

Everything follows the device's pushed change events (State, Status, counters, throughput, the settings,
``last_pattern``/``radial_axis``).  The device pushes no events for ``sinogram`` (nor for the sinogram bin range),
so the image is re-read whenever a ``frames_processed`` event arrives (at most ``SINOGRAM_MAX_RATE`` per second).

DEVICE is a Tango device name (``xrdct/reducer/bl11`` with TANGO_HOST set), a full TRL
(``tango://host:port/xrdct/reducer/bl11``) or a no-database name (``tango-nodb://127.0.0.1:PORT/test/nodb/x``).
Taurus, taurus_pyqtgraph, pyqtgraph and PyQt5 are needed (the ``gui`` extra); nothing here is imported by the
device server.
"""

from __future__ import annotations

import argparse
import sys
import time

SETTINGS = ("bins", "mask", "unit", "scan_shape", "sinogram_bin_start", "sinogram_bin_stop")
COUNTERS = ("frames_processed", "frames_expected", "frames_missing", "frames_failed", "backlog", "latency",
            "throughput", "masked_pixels", "output_file", "engine", "landing_directory")
LONG_TEXTS = ("output_file", "engine", "landing_directory")
SINOGRAM_MAX_RATE = 2.0  # sinogram reads per second, at most
UNIT_AXIS = {"q_nm^-1": "q (nm\u207b\u00b9)", "q_A^-1": "q (\u00c5\u207b\u00b9)", "2th_deg": "2\u03b8 (deg)"}


def _device_name(device: str) -> str:
    """Model name of the device: plain names and TRLs are used as given, without a trailing slash."""
    return device.strip().rstrip("/")


def build_panel(device: str, parent=None):
    """The panel window for ``device`` (a QMainWindow; a Qt application must exist)."""
    # taurus first: it selects the Qt binding (PyQt5 by default), pyqtgraph then uses the one already imported
    from taurus.external.qt import Qt  # noqa: I001

    import pyqtgraph as pg
    import taurus
    from taurus.core.taurusbasetypes import TaurusEventType
    from taurus.qt.qtgui.button import TaurusCommandButton
    from taurus.qt.qtgui.display import TaurusLabel
    from taurus.qt.qtgui.panel import TaurusForm
    from taurus_pyqtgraph import TaurusPlot, TaurusTrend

    dev = _device_name(device)

    def model(attr: str) -> str:
        return f"{dev}/{attr}"

    class Relay(Qt.QObject):
        """Receives taurus events (any thread) and re-emits their values in the Qt thread."""

        value = Qt.pyqtSignal(object)

        def __init__(self, attr: str, slot, parent):
            super().__init__(parent)
            # connected before listening (addListener delivers the current value at once), and queued: the slot
            # runs later in the Qt thread, never inside taurus' callback (Tango calls there can deadlock)
            self.value.connect(slot, Qt.Qt.QueuedConnection)
            self.attr = taurus.Attribute(model(attr))
            self.attr.addListener(self)  # taurus keeps a weak reference; the panel keeps the relay

        def eventReceived(self, src, evt_type, evt_value):
            if evt_type in (TaurusEventType.Change, TaurusEventType.Periodic) and evt_value is not None:
                self.value.emit(evt_value.rvalue)

        def close(self):
            self.attr.removeListener(self)

    class Panel(Qt.QMainWindow):
        def __init__(self):
            super().__init__(parent)
            self.device = dev
            self.setWindowTitle(f"XRD-CT reduction - {dev}")
            self.resize(1600, 1000)
            self.setDockOptions(Qt.QMainWindow.AnimatedDocks | Qt.QMainWindow.AllowNestedDocks)
            self._relays = []

            # centre: the last pattern against the radial axis
            self.pattern_plot = TaurusPlot()
            self.pattern_plot.setModel([(model("radial_axis"), model("last_pattern"))])
            self.pattern_plot.setLabel("left", "intensity (a.u.)")
            self.pattern_plot.setLabel("bottom", "radial")
            self.pattern_plot.setTitle("Last reduced pattern")
            self.setCentralWidget(self.pattern_plot)

            # control: state, status, commands
            control = Qt.QWidget()
            lay = Qt.QGridLayout(control)
            self.state_label = TaurusLabel()
            self.state_label.setModel(model("State"))
            self.state_label.setBgRole("value")
            self.state_label.setMinimumWidth(120)
            self.status_label = TaurusLabel()
            self.status_label.setModel(model("Status"))
            self.status_label.setWordWrap(True)
            self.status_label.setAutoTrim(False)
            self.status_label.setAlignment(Qt.Qt.AlignLeft | Qt.Qt.AlignTop)
            self.status_label.setMinimumHeight(60)
            self.status_label.setSizePolicy(Qt.QSizePolicy.Expanding, Qt.QSizePolicy.Preferred)
            self.output_name = Qt.QLineEdit()
            self.output_name.setPlaceholderText("output name (empty: automatic, xrdct_<date>_<time>.h5)")
            self.start_button = TaurusCommandButton(command="Start", parameters=[""], text="Start")
            self.stop_button = TaurusCommandButton(command="Stop", text="Stop")
            self.reset_button = TaurusCommandButton(command="Reset", text="Reset")
            for button in (self.start_button, self.stop_button, self.reset_button):
                button.setModel(dev)
            self.output_name.textChanged.connect(lambda text: self.start_button.setParameters([text.strip()]))
            lay.addWidget(Qt.QLabel("State"), 0, 0)
            lay.addWidget(self.state_label, 0, 1, 1, 3)
            lay.addWidget(self.status_label, 1, 0, 1, 4)
            lay.addWidget(Qt.QLabel("Output"), 2, 0)
            lay.addWidget(self.output_name, 2, 1, 1, 3)
            lay.addWidget(self.start_button, 3, 1)
            lay.addWidget(self.stop_button, 3, 2)
            lay.addWidget(self.reset_button, 3, 3)
            lay.setColumnStretch(1, 1)
            lay.setColumnStretch(2, 1)
            lay.setColumnStretch(3, 1)

            # counters: a compact grid of TaurusLabels (two per row), long texts below, wrapped
            counters = Qt.QWidget()
            clay = Qt.QGridLayout(counters)
            self.counter_labels = {}
            short = [a for a in COUNTERS if a not in LONG_TEXTS]
            for i, attr in enumerate(short):
                label = TaurusLabel()
                label.setModel(model(attr))
                label.setMinimumWidth(70)
                caption = Qt.QLabel(attr.replace("_", " ").capitalize())
                clay.addWidget(caption, i // 2, 2 * (i % 2))
                clay.addWidget(label, i // 2, 2 * (i % 2) + 1)
                self.counter_labels[attr] = label
            row = (len(short) + 1) // 2
            for attr in LONG_TEXTS:
                label = TaurusLabel()
                label.setModel(model(attr))
                label.setWordWrap(True)
                label.setAutoTrim(False)
                label.setAlignment(Qt.Qt.AlignLeft | Qt.Qt.AlignVCenter)
                label.setSizePolicy(Qt.QSizePolicy.Ignored, Qt.QSizePolicy.Preferred)
                clay.addWidget(Qt.QLabel(attr.replace("_", " ").capitalize()), row, 0)
                clay.addWidget(label, row, 1, 1, 3)
                self.counter_labels[attr] = label
                row += 1
            clay.setColumnStretch(1, 1)
            clay.setColumnStretch(3, 1)
            clay.setRowStretch(row, 1)

            # settings: geometry text editor + a form for the rest
            settings = Qt.QWidget()
            slay = Qt.QVBoxLayout(settings)
            slay.addWidget(Qt.QLabel("Geometry (PONI text)"))
            self.geometry_edit = Qt.QPlainTextEdit()
            self.geometry_edit.setPlaceholderText("no geometry yet: paste PONI text or load a .poni file, then Apply")
            self.geometry_edit.setMaximumHeight(150)
            self.geometry_edit.setLineWrapMode(Qt.QPlainTextEdit.NoWrap)
            slay.addWidget(self.geometry_edit)
            row = Qt.QHBoxLayout()
            self.load_poni_button = Qt.QPushButton("Load PONI file...")
            self.apply_geometry_button = Qt.QPushButton("Apply geometry")
            self.revert_geometry_button = Qt.QPushButton("Revert")
            row.addWidget(self.load_poni_button)
            row.addWidget(self.apply_geometry_button)
            row.addWidget(self.revert_geometry_button)
            slay.addLayout(row)
            self.settings_form = TaurusForm()
            self.settings_form.setModel([model(a) for a in SETTINGS])
            slay.addWidget(self.settings_form)
            self._geometry = ""
            self.load_poni_button.clicked.connect(self._load_poni)
            self.apply_geometry_button.clicked.connect(self._apply_geometry)
            self.revert_geometry_button.clicked.connect(lambda: self._show_geometry(self._geometry, force=True))

            # sinogram image
            self.sinogram_view = pg.PlotWidget()
            self.sinogram_view.setMinimumWidth(300)
            self.sinogram_view.setLabel("left", "rotation")
            self.sinogram_view.setLabel("bottom", "translation")
            self.sinogram_view.setTitle("Sinogram (sinogram_bin_start..stop)")
            self.sinogram_view.getPlotItem().invertY(True)
            self.sinogram_item = pg.ImageItem(axisOrder="row-major")
            self.sinogram_view.addItem(self.sinogram_item)
            self.sinogram_bar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), interactive=False)
            self.sinogram_bar.setImageItem(self.sinogram_item, insert_in=self.sinogram_view.getPlotItem())
            self._sinogram_read = 0.0
            self._sinogram_pending = False
            self.sinogram_timer = Qt.QTimer(self)
            self.sinogram_timer.setSingleShot(True)
            self.sinogram_timer.timeout.connect(self.refresh_sinogram)

            # throughput trend
            self.throughput_trend = TaurusTrend()
            self.throughput_trend.setModel([model("throughput")])
            self.throughput_trend.setLabel("left", "throughput (frames/s)")

            def scrolled(widget):  # long paths must not widen the column: scroll instead
                area = Qt.QScrollArea()
                area.setWidgetResizable(True)
                area.setWidget(widget)
                area.setMinimumWidth(360)
                return area

            docks = {}
            for name, widget, area in (("Control", control, Qt.Qt.LeftDockWidgetArea),
                                       ("Counters", scrolled(counters), Qt.Qt.LeftDockWidgetArea),
                                       ("Settings", scrolled(settings), Qt.Qt.LeftDockWidgetArea),
                                       ("Sinogram", self.sinogram_view, Qt.Qt.RightDockWidgetArea),
                                       ("Throughput", self.throughput_trend, Qt.Qt.RightDockWidgetArea)):
                dock = Qt.QDockWidget(name, self)
                dock.setObjectName(f"dock_{name}")
                dock.setWidget(widget)
                dock.setFeatures(Qt.QDockWidget.DockWidgetMovable | Qt.QDockWidget.DockWidgetFloatable)
                self.addDockWidget(area, dock)
                docks[name] = dock
            self.docks = docks
            self.pattern_plot.setMinimumWidth(450)
            self._sized = False

            # event-driven extras: geometry text, x-axis label from the unit, sinogram refresh
            self._follow("geometry", self._show_geometry)
            self._follow("unit", self._show_unit)
            self._follow("frames_processed", lambda _value: self.request_sinogram())
            self.request_sinogram()

        def showEvent(self, event):
            super().showEvent(event)
            if not self._sized:  # the default layout (there is no saved one), once the window has its size
                self._sized = True
                Qt.QTimer.singleShot(0, self.default_layout)

        def default_layout(self):
            # long texts (paths, engine) are elided in place instead of widening the left column
            for form in (self.settings_form,):
                for item in form.getItems():
                    for widget in (item.readWidget(), item.writeWidget()):
                        if widget is not None:
                            widget.setSizePolicy(Qt.QSizePolicy.Ignored, widget.sizePolicy().verticalPolicy())
            d = self.docks
            w, h = self.width(), self.height()
            self.resizeDocks([d["Control"], d["Sinogram"]], [int(w * 0.4), int(w * 0.26)], Qt.Qt.Horizontal)
            self.resizeDocks([d["Control"], d["Counters"], d["Settings"]],
                             [int(h * 0.2), int(h * 0.35), int(h * 0.45)], Qt.Qt.Vertical)
            self.resizeDocks([d["Sinogram"], d["Throughput"]], [int(h * 0.55), int(h * 0.45)], Qt.Qt.Vertical)

        # -- helpers ----------------------------------------------------------------------------------
        def _follow(self, attr, slot):
            self._relays.append(Relay(attr, slot, self))

        def _show_geometry(self, text, force=False):
            self._geometry = text or ""
            if force or not self.geometry_edit.document().isModified():
                self.geometry_edit.setPlainText(self._geometry)
                self.geometry_edit.document().setModified(False)

        def _show_unit(self, value):
            label = getattr(value, "name", None) or str(value)  # taurus gives DevEnum values as Enum members
            self.pattern_plot.setLabel("bottom", UNIT_AXIS.get(label, label))

        def _load_poni(self):
            path, _ = Qt.QFileDialog.getOpenFileName(self, "PONI file", "", "PONI files (*.poni);;All files (*)")
            if path:
                with open(path) as f:
                    self.geometry_edit.setPlainText(f.read())
                self.geometry_edit.document().setModified(True)

        def _apply_geometry(self):
            text = self.geometry_edit.toPlainText()
            try:
                taurus.Device(dev).getDeviceProxy().write_attribute("geometry", text)
            except Exception as exc:  # readable message, the editor keeps the text
                Qt.QMessageBox.warning(self, "Geometry not applied", _describe(exc))
                return
            self.geometry_edit.document().setModified(False)

        def request_sinogram(self):
            """Re-read the sinogram soon (rate-limited)."""
            if self.sinogram_timer.isActive():
                return
            wait = max(0.0, self._sinogram_read + 1.0 / SINOGRAM_MAX_RATE - time.monotonic())
            self.sinogram_timer.start(int(wait * 1000))

        def refresh_sinogram(self):
            import numpy as np

            self._sinogram_read = time.monotonic()
            try:
                data = taurus.Device(dev).getDeviceProxy().read_attribute("sinogram").value
            except Exception:
                return
            if data is None or np.size(data) == 0:
                self.sinogram_item.clear()
                return
            data = np.asarray(data, dtype=np.float32)
            finite = data[np.isfinite(data)]
            levels = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if levels[1] <= levels[0]:
                levels = (levels[0], levels[0] + 1.0)
            self.sinogram_item.setImage(np.nan_to_num(data, nan=levels[0]), levels=levels)
            self.sinogram_bar.setLevels(levels)

        def closeEvent(self, event):
            self.shutdown()
            super().closeEvent(event)

        def shutdown(self):
            """Stop listening (called on close)."""
            self.sinogram_timer.stop()
            for relay in self._relays:
                relay.close()
            self._relays = []

    return Panel()


def _describe(exc: Exception) -> str:
    args = getattr(exc, "args", ())
    if args and hasattr(args[0], "desc"):  # tango.DevFailed
        return "\n".join(f"{e.reason}: {e.desc}" for e in args)
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xrdct panel", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("device", help="device name (xrdct/reducer/NAME with TANGO_HOST) or full TRL")
    parser.add_argument("--screenshot", help="save a PNG of the panel after --seconds and quit (for docs/CI)")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to run before --screenshot")


def run(args) -> int:
    from taurus.external.qt import Qt
    from taurus.qt.qtgui.application import TaurusApplication

    app = TaurusApplication.instance() or TaurusApplication(sys.argv[:1], cmd_line_parser=None,
                                                           app_name="xrdct-panel")
    panel = build_panel(args.device)
    panel.show()
    if args.screenshot:
        def snap():
            panel.grab().save(args.screenshot)
            panel.close()
            app.quit()
        Qt.QTimer.singleShot(int(args.seconds * 1000), snap)
    return app.exec_()


if __name__ == "__main__":
    sys.exit(main())
