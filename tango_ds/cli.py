"""``xrdct serve``: run the XRDCTReducer device, with an embedded sqlite Tango database when no TANGO_HOST is set.

Embedded mode starts pytango-db's ``PyDatabaseds`` (a real Tango database server backed by sqlite, no MySQL)
on localhost, registers the server ``XRDCTReducer/<NAME>`` with the device ``xrdct/reducer/<NAME>`` and its
properties, starts ``python -m tango_ds.server <NAME>`` and waits until the device answers.  With TANGO_HOST
set, the server is registered into that database instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SERVER = "XRDCTReducer"
DEFAULT_DB_FILE = Path.home() / ".xrdct" / "tango_database.db"


def device_name(instance: str) -> str:
    return f"xrdct/reducer/{instance}"


def _stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_database(port: int = 10000, db_file: str | Path = DEFAULT_DB_FILE, host: str = "127.0.0.1",
                   log: Path | None = None, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start PyDatabaseds (sqlite) on host:port (0: a free port).  Returns (process, TANGO_HOST)."""
    import tango

    env = os.environ.copy()
    if str(db_file) != ":memory:":
        Path(db_file).parent.mkdir(parents=True, exist_ok=True)
    env["PYTANGO_DATABASE_NAME"] = str(db_file)
    env["TANGO_HOST"] = f"{host}:{port}"
    out = open(log, "w+b") if log else tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 - kept by the process
    cmd = [sys.executable, "-m", "databaseds.database", "--port", str(port), "--host", host, "--print-host-port", "2"]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    start = time.monotonic()
    pattern = re.compile(rb"Database DS listening on:.*, port=(\d+)\.")
    actual = port or None
    while True:
        if proc.poll() is not None:
            out.seek(0)
            raise RuntimeError(f"Tango database exited ({proc.returncode}):\n{out.read().decode(errors='replace')}")
        if time.monotonic() - start > timeout:
            _stop_process(proc)
            raise RuntimeError(f"Tango database did not answer on {host}:{port} within {timeout:.0f} s")
        if actual is None:
            out.seek(0)
            match = pattern.search(out.read())
            if match:
                actual = int(match.group(1))
        if actual is not None:
            try:
                tango.Database(host, actual).get_info()
                return proc, f"{host}:{actual}"
            except tango.DevFailed:
                pass
        time.sleep(0.1)


def register(tango_host: str, instance: str, properties: dict[str, str]) -> str:
    """Register server XRDCTReducer/<instance> and device xrdct/reducer/<instance> with its properties."""
    import tango

    host, port = tango_host.rsplit(":", 1)
    db = tango.Database(host, int(port))
    info = tango.DbDevInfo()
    info.name = device_name(instance)
    info._class = SERVER
    info.server = f"{SERVER}/{instance}"
    db.add_device(info)
    props = {k: [str(v)] for k, v in properties.items() if v is not None}
    if props:
        db.put_device_property(info.name, props)
    return info.name


def start_server(tango_host: str, instance: str, log: Path | None = None) -> subprocess.Popen:
    env = os.environ.copy()
    env["TANGO_HOST"] = tango_host
    stdout = open(log, "wb") if log else None  # noqa: SIM115 - kept by the process
    return subprocess.Popen([sys.executable, "-m", "tango_ds.server", instance], env=env, stdout=stdout,
                            stderr=subprocess.STDOUT if log else None)


def wait_for_device(trl: str, proc: subprocess.Popen | None = None, timeout: float = 60.0, log: Path | None = None):
    """A DeviceProxy once the device answers State."""
    import tango

    start = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"device server exited with code {proc.returncode}\n{text}")
        try:
            proxy = tango.DeviceProxy(trl)
            proxy.state()
            return proxy
        except tango.DevFailed:
            if time.monotonic() - start > timeout:
                raise
        time.sleep(0.2)


@contextlib.contextmanager
def serving(instance: str = "demo", port: int = 10000, properties: dict[str, str] | None = None,
            db_file: str | Path = DEFAULT_DB_FILE, logdir: Path | None = None,
            tango_host: str | None = None) -> Iterator[tuple[str, str, object]]:
    """Database (embedded unless ``tango_host``), registration, server process; yields (TANGO_HOST, device, proxy)."""
    db_proc = server = None
    db_log = logdir / "databaseds.log" if logdir else None
    ds_log = logdir / f"{SERVER}_{instance}.log" if logdir else None
    try:
        if tango_host is None:
            db_proc, tango_host = start_database(port, db_file, log=db_log)
        name = register(tango_host, instance, properties or {})
        server = start_server(tango_host, instance, ds_log)
        proxy = wait_for_device(f"tango://{tango_host}/{name}", server, log=ds_log)
        yield tango_host, name, proxy
    finally:
        _stop_process(server)
        _stop_process(db_proc)


def cmd_serve(args) -> int:
    properties = {"LandingDirectory": args.landing, "OutputDirectory": args.output, "Engine": args.engine,
                  "ScanShape": args.scan, "DefaultPoni": args.poni, "DefaultMask": args.mask}
    for key in ("LandingDirectory", "OutputDirectory"):
        if properties[key]:
            properties[key] = str(Path(properties[key]).resolve())
            Path(properties[key]).mkdir(parents=True, exist_ok=True)
    properties = {k: v for k, v in properties.items() if v}
    env_host = os.environ.get("TANGO_HOST")

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        with serving(args.instance, args.port, properties, db_file=args.db_file, tango_host=env_host) as (
                host, name, proxy):
            where = "existing database" if env_host else f"embedded sqlite database {args.db_file}"
            print(f"TANGO_HOST={host}")
            print(f"device: {name}  (server {SERVER}/{args.instance}, {where}); state {proxy.state()}")
            print(f"in another shell: export TANGO_HOST={host}; then use Jive, Taurus or "
                  f"tango.DeviceProxy('{name}').  Ctrl+C stops.", flush=True)
            while True:
                time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping the device server", file=sys.stderr)
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("serve", help="run the XRDCTReducer Tango device (embedded sqlite Tango DB without TANGO_HOST)")
    p.add_argument("--instance", default="demo", help="server instance; the device is xrdct/reducer/NAME")
    p.add_argument("--port", type=int, default=10000, help="port of the embedded database (default 10000)")
    p.add_argument("--landing", help="LandingDirectory property (frames land here)")
    p.add_argument("--output", help="OutputDirectory property (NeXus files go here)")
    p.add_argument("--engine", default=None, choices=["auto", "cpu", "opencl"], help="Engine property")
    p.add_argument("--scan", default=None, help="ScanShape property NROTxNTRANS")
    p.add_argument("--poni", default=None, help="DefaultPoni property (PONI file)")
    p.add_argument("--mask", default=None, help="DefaultMask property (mask file)")
    p.add_argument("--db-file", default=str(DEFAULT_DB_FILE),
                   help=f"sqlite file of the embedded database (default {DEFAULT_DB_FILE}; ':memory:' forgets)")
    p.set_defaults(func=cmd_serve)

    from .panel import add_arguments as add_panel_arguments

    p = sub.add_parser("panel", help="open the Taurus operator panel of an XRDCTReducer device (needs the gui extra)")
    add_panel_arguments(p)
    p.set_defaults(func=_cmd_panel)


def _cmd_panel(args) -> int:
    from .panel import run

    return run(args)
