"""``xrdct demo``: the real thing on one machine.

An embedded sqlite Tango database and the XRDCTReducer device server are started; a simulated Pilatus writes a
short XRD-CT scan into a landing directory at a fixed rate; a DeviceProxy client configures geometry, bins and
mask, calls Start, follows the progress and throughput through change events, calls Stop at the end, and a
PNG of the sinogram is made from the NeXus file.
"""

from __future__ import annotations

import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path


def run_demo(args) -> int:
    import tango

    from pipeline.preview import save_demo_pictures
    from pipeline.simulate import Player, SimulatedScan

    from .cli import serving

    work = Path(args.workdir) if getattr(args, "workdir", None) else Path(tempfile.mkdtemp(prefix="xrdct-demo-"))
    work = work.resolve()
    landing, output, logs = work / "landing", work / "output", work / "logs"
    if landing.exists():
        shutil.rmtree(landing)
    for d in (landing, output, logs):
        d.mkdir(parents=True, exist_ok=True)
    rate = float(getattr(args, "rate", 250.0))
    bins = int(getattr(args, "bins", 1000))
    engine = getattr(args, "engine", "auto") or "auto"

    sim = SimulatedScan(args.rotations, args.translations, seed=1)
    files = sim.write_support_files(work)
    properties = {"LandingDirectory": str(landing), "OutputDirectory": str(output), "Engine": engine,
                  "MissingTimeout": "3.0", "BacklogAlarm": str(max(32, sim.n_frames)),
                  "MaskDirectories": str(work)}  # the mask written below lies in work/
    print("starting an embedded Tango database and the XRDCTReducer device server...", flush=True)
    db_file = work / "tango_database.db"
    t0 = time.perf_counter()
    with serving("demo", port=0, properties=properties, db_file=db_file, logdir=logs) as (host, name, dev):
        print(f"TANGO_HOST={host}  device {name} answers ({time.perf_counter() - t0:.1f} s); logs in {logs}")
        print(f"simulating a {sim.rotations}x{sim.translations} XRD-CT scan of a 3-phase phantom...", flush=True)
        sim.prepare()

        dev.set_timeout_millis(10_000)  # a loaded 2-core machine can be slow to answer the first commands
        dev.geometry = files["poni"].read_text()
        dev.bins = bins
        dev.mask = str(files["mask"])
        dev.scan_shape = f"{sim.rotations}x{sim.translations}"
        print(f"configured: bins={dev.bins}, mask {dev.mask} ({dev.masked_pixels} pixels), unit "
              f"{dev.get_attribute_config('unit').enum_labels[int(dev.unit)]}")

        events: queue.Queue = queue.Queue()
        ids = [dev.subscribe_event(a, tango.EventType.CHANGE_EVENT, events.put)
               for a in ("State", "frames_processed", "throughput")]
        nexus = Path(dev.Start("demo_scan.h5"))
        print(f"Start -> {nexus.name}; state {dev.state()}: {dev.status()}")
        while "preparing" in dev.status():
            time.sleep(0.1)
        player = Player(sim, landing, rate=rate)
        print(f"detector writing {sim.n_frames} frames at {rate:g} fps into {landing}", flush=True)
        player.start()
        last, best, state = 0.0, 0.0, dev.state()
        deadline = time.monotonic() + 60 + sim.n_frames / max(rate, 1e-3)
        done = False
        while time.monotonic() < deadline and not done:
            try:
                ev = events.get(timeout=0.5)
            except queue.Empty:
                ev = None
            if ev is not None and not ev.err and ev.attr_value is not None:
                attr = ev.attr_name.split("#", 1)[0].rsplit("/", 1)[-1].lower()
                if attr == "state":
                    state = ev.attr_value.value
                elif attr == "throughput":
                    best = max(best, float(ev.attr_value.value))
            processed = dev.frames_processed
            done = processed + dev.frames_missing + dev.frames_failed >= sim.n_frames
            if time.monotonic() - last > 0.5 or done:
                last = time.monotonic()
                state = dev.state()
                print(f"  {str(state):8s} {processed:4d}/{sim.n_frames} frames  {dev.throughput:6.1f} fps  "
                      f"backlog {dev.backlog:3d}  latency {dev.latency * 1e3:5.0f} ms", flush=True)
        player.join(10)
        t = time.perf_counter()
        if dev.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
            dev.Stop()
            print(f"Stop returned in {time.perf_counter() - t:.2f} s")
        else:
            print("scan complete: the device closed the file by itself (no Stop needed)")
        while dev.state() == tango.DevState.RUNNING and time.perf_counter() - t < 30:
            time.sleep(0.1)
        final = dev.state()
        summary = (dev.frames_processed, dev.frames_expected, dev.frames_missing, dev.frames_failed)
        print(f"state {final}: {dev.status()}")
        print(f"engine: {dev.engine}; peak throughput {best:.1f} fps")
        for i in ids:
            dev.unsubscribe_event(i)
    print(f"reduced {summary[0]}/{summary[1]} frames (missing {summary[2]}, failed {summary[3]})")
    print(f"NeXus file: {nexus}")
    pictures = save_demo_pictures(nexus, work)
    print(f"sinogram picture: {pictures['sinogram']}")
    print(f"tomogram picture (tomograms next to their sinograms, also in the NeXus file): {pictures['tomogram']}")
    ok = final == tango.DevState.ON and summary[0] == sim.n_frames
    if not ok:
        print("demo did not reduce every frame", file=sys.stderr)
    return 0 if ok else 1
