"""XRDCTReducer registered in a real (sqlite, pytango-db) Tango database, driven by a DeviceProxy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import tango
from tango_support import BINS, ROT, SUPPORT_DIRS, TRANS, configure, read_nexus, wait_for

from pipeline.simulate import Player

pytest.importorskip("databaseds")
from databaseds.fixtures import run_device_server  # noqa: E402

from tango_ds.device import XRDCTReducer  # noqa: E402

pytestmark = [pytest.mark.tango, pytest.mark.timeout(180)]

DEVICE = "xrdct/reducer/ci"


def _server(landing, output):
    return dict(server_instance="XRDCTReducer/ci",
                device_classes={XRDCTReducer: {DEVICE: {"properties": {
                    "LandingDirectory": [str(landing)], "OutputDirectory": [str(output)], "Engine": ["cpu"],
                    "MissingTimeout": ["2.0"], "MaskDirectories": list(SUPPORT_DIRS)}}}})


def test_scan_and_memorized_attributes_survive_restart(pytango_db, dirs, sim_scan):
    landing, output = dirs
    with run_device_server(**_server(landing, output), cleanup_db=False) as (dev,):
        assert dev.state() == tango.DevState.ON
        assert dev.landing_directory == str(landing)
        configure(dev, sim_scan, bins=BINS + 7)
        dev.unit = 2
        # a scan through the database-registered device
        path = dev.Start("db_scan")
        wait_for(lambda: "preparing" not in dev.status())
        Player(sim_scan, landing, rate=0).run()
        wait_for(lambda: dev.state() == tango.DevState.ON, timeout=60)
        assert dev.frames_processed == ROT * TRANS
        assert read_nexus(path)["integrated"].shape == (ROT * TRANS, BINS + 7)
    db = tango.Database()
    stored = db.get_device_attribute_property(DEVICE, ["bins", "geometry", "unit", "mask", "scan_shape"])
    assert stored["bins"]["__value"] == [str(BINS + 7)]
    assert stored["unit"]["__value"] == ["2"]

    # restart the server process: hw_memorized values are written back at start-up
    with run_device_server(**_server(landing, output)) as (dev,):
        assert dev.bins == BINS + 7
        assert int(dev.unit) == 2
        assert dev.geometry == sim_scan.poni_text
        assert dev.mask == str(sim_scan.mask_path)
        assert dev.scan_shape == f"{ROT}x{TRANS}"
        assert dev.masked_pixels > 0
        assert dev.state() == tango.DevState.ON


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_xrdct_serve_embedded_database(tmp_path):
    """``xrdct serve`` without TANGO_HOST: embedded sqlite DB, prints TANGO_HOST and the device once it answers."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--instance", "t1", "--port", str(port),
           "--landing", str(tmp_path / "landing"), "--output", str(tmp_path / "out"),
           "--db-file", str(tmp_path / "db.sqlite")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("device:"):
                break
        text = "".join(lines)
        assert f"TANGO_HOST=127.0.0.1:{port}" in text, text
        assert "xrdct/reducer/t1" in text, text
        dev = tango.DeviceProxy(f"tango://127.0.0.1:{port}/xrdct/reducer/t1")
        assert dev.state() == tango.DevState.ON
        assert dev.landing_directory == str(tmp_path / "landing")
        assert (tmp_path / "landing").is_dir() and (tmp_path / "db.sqlite").is_file()
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0
    with pytest.raises(tango.DevFailed):
        tango.DeviceProxy(f"tango://127.0.0.1:{port}/xrdct/reducer/t1").state()
