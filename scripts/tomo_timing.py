#!/usr/bin/env python3
"""Reconstruction time per channel of pipeline.tomo's filtered back-projection: the CPU (scipy.sparse) and
every OpenCL device found, for XRD-CT sinograms of realistic size; a table, and JSON with --json.

    python scripts/tomo_timing.py --sizes 180x100 180x200 360x200 --channels 1 8 --json tomo_timing.json

Columns: ``first`` = the first call (the CPU builds and caches its sparse matrix, as at a scan's first
update and once more when the centre is estimated; OpenCL allocates its buffers, and builds its program
on the device's first row only), ``update`` = median of ``--repeats`` further calls (what a live update costs once
the geometry is cached), ``per channel`` = update / channels, ``filter`` = the ramp filter's share (host
FFTs, the same for every back-projector; per channel), ``py beside`` = the speed of a pure-Python loop in the main
thread while reconstructions run in another thread, relative to that loop alone (1.0: the
reconstruction took no GIL time from the pipeline's threads), and ``live`` = one
``LiveTomography.update_now`` of 3 peak channels from a [rotation, translation, ``--bins``] cube
(channel extraction + reconstruction).  Needs only numpy, scipy and (for OpenCL) pyopencl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import tomo  # noqa: E402


def disc_sinograms(n_channels: int, n_rot: int, n_trans: int, seed: int = 0) -> np.ndarray:
    """[channel, rotation, translation] float32: exact parallel-beam projections of a few discs per channel."""
    rng = np.random.default_rng(seed)
    theta = np.deg2rad(tomo.default_angles(n_rot))
    t = np.arange(n_trans, dtype=np.float64)
    centre = (n_trans - 1) / 2.0
    out = np.zeros((n_channels, n_rot, n_trans))
    for c in range(n_channels):
        for _ in range(4):
            r = rng.uniform(0.05, 0.25) * n_trans
            x0, y0 = rng.uniform(-0.2, 0.2, 2) * n_trans
            tc = centre + x0 * np.cos(theta) - y0 * np.sin(theta)  # the disc centre's track
            d2 = r * r - (t[None, :] - tc[:, None]) ** 2
            out[c] += rng.uniform(0.5, 2.0) * 2.0 * np.sqrt(np.clip(d2, 0.0, None))
    return out.astype(np.float32)


def python_speed_beside(work, seconds: float = 1.0) -> float:
    """Pure-Python loop rate in this thread while ``work()`` repeats in another, over the rate beside a sleeper."""

    def rate(target) -> float:
        done = threading.Event()

        def run() -> None:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                target()
            done.set()

        thread = threading.Thread(target=run, daemon=True)
        n = 0
        t0 = time.perf_counter()
        thread.start()
        while not done.is_set():
            n += 1
        elapsed = time.perf_counter() - t0
        thread.join()
        return n / elapsed

    idle = rate(lambda: time.sleep(0.01))
    return rate(work) / idle


def opencl_devices() -> list[tuple[str, str, str]]:
    """(spec "P:D", name, type) of every OpenCL device; empty without pyopencl."""
    try:
        import pyopencl as cl

        from pipeline.opencl.devices import list_devices
    except Exception as exc:  # noqa: BLE001 - no pyopencl: CPU only
        print(f"no OpenCL ({exc})", file=sys.stderr)
        return []
    out = []
    for pi, di, dev in list_devices():
        kind = "GPU" if dev.type & cl.device_type.GPU else "CPU" if dev.type & cl.device_type.CPU else "other"
        out.append((f"{pi}:{di}", f"{dev.platform.name.strip()} / {dev.name.strip()}", kind))
    return out


def time_backend(engine: str, device: str | None, stack: np.ndarray, angles: np.ndarray, repeats: int,
                 gil: bool) -> dict:
    center = (stack.shape[2] - 1) / 2.0 + 0.3
    kwargs = dict(engine=engine, device=device, center=center)
    with tomo._MATRIX_LOCK:  # a cold CPU geometry, as at the first update of a scan
        tomo._MATRIX_CACHE.clear()
    t0 = time.perf_counter()
    rec = tomo.reconstruct(stack, angles, **kwargs)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tomo.reconstruct(stack, angles, **kwargs)
        times.append(time.perf_counter() - t0)
    update = statistics.median(times)
    out = dict(engine=rec.engine, first_s=first, update_s=update, per_channel_s=update / stack.shape[0],
               update_min_s=min(times), update_max_s=max(times))
    if gil:
        out["python_speed_beside"] = python_speed_beside(lambda: tomo.reconstruct(stack, angles, **kwargs))
    return out


def time_live(device: str, n_rot: int, n_trans: int, bins: int) -> dict:
    """One forced LiveTomography update of 3 peak channels from a [rotation, translation, bins] cube."""
    from pipeline.live_tomo import LiveTomography

    q = np.linspace(5.0, 50.0, bins)
    centres = (12.0, 23.0, 37.0)
    profiles = np.stack([np.exp(-0.5 * ((q - c) / 0.15) ** 2) for c in centres]).astype(np.float32)
    amounts = disc_sinograms(3, n_rot, n_trans, seed=1)
    cube = np.einsum("crt,cb->rtb", amounts, profiles, dtype=np.float32) + np.float32(0.5)
    measured = np.ones((n_rot, n_trans), np.uint8)
    ranges = tomo.radial_to_bins(q, [(c - 0.3, c + 0.3) for c in centres])
    live = LiveTomography(q, n_rot, n_trans, channels=ranges, center=(n_trans - 1) / 2.0, device=device)
    live.update_now(lambda: (cube, measured), force=True)  # geometry and device set up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        live.update_now(lambda: (cube, measured), force=True)
        times.append(time.perf_counter() - t0)
    stats = live.stats
    if stats["failures"]:
        raise RuntimeError(stats["last_error"])
    return dict(live_update_s=statistics.median(times), live_backprojector=stats["backprojector"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["180x100", "180x200", "360x200"], help="ROTATIONSxTRANSLATIONS")
    p.add_argument("--channels", nargs="+", type=int, default=[1, 8], help="channels back-projected per call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bins", type=int, default=1000, help="radial bins of the cube for the live column (0: skip)")
    p.add_argument("--no-cpu", action="store_true", help="OpenCL devices only")
    p.add_argument("--no-opencl", action="store_true", help="the CPU only")
    p.add_argument("--no-gil", action="store_true", help="skip the GIL measurement (py beside)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    devices = [] if args.no_opencl else opencl_devices()
    backends: list[tuple[str, str | None, str]] = [] if args.no_cpu else [("cpu", None, "cpu: scipy.sparse")]
    backends += [("opencl", spec, f"opencl {spec}: {name} ({kind})") for spec, name, kind in devices]
    import scipy

    info = dict(host=platform.node(), machine=platform.machine(), processor=platform.processor(),
                cpus=os.cpu_count(), python=platform.python_version(), numpy=np.__version__,
                scipy=scipy.__version__, opencl_devices=[dict(spec=s, name=n, type=k) for s, n, k in devices])
    try:
        import pyopencl

        info["pyopencl"] = pyopencl.VERSION_TEXT
    except ImportError:
        pass
    results = []
    header = (f"{'size':>8} {'back-projector':50} {'ch':>3} {'first s':>8} {'update ms':>10} {'per ch ms':>10} "
              f"{'filt/ch ms':>10} {'py beside':>9} {'live ms':>8}")
    print(f"{info['cpus']} CPUs, numpy {info['numpy']}, scipy {info['scipy']}, "
          f"OpenCL devices: {', '.join(n for _, n, _ in devices) or 'none'}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        n_rot, n_trans = (int(v) for v in size.lower().split("x"))
        angles = tomo.default_angles(n_rot)
        for n_ch in args.channels:
            stack = disc_sinograms(n_ch, n_rot, n_trans)
            t0 = time.perf_counter()
            for _ in range(3):
                tomo.filter_sinogram(stack)
            filter_s = (time.perf_counter() - t0) / 3
            for engine, spec, label in backends:
                row = dict(rotations=n_rot, translations=n_trans, channels=n_ch, backend=label, filter_s=filter_s)
                try:
                    row.update(time_backend(engine, spec, stack, angles, args.repeats,
                                            gil=not args.no_gil and n_ch == max(args.channels)))
                    if args.bins and n_ch == max(args.channels):
                        row.update(time_live("cpu" if spec is None else spec, n_rot, n_trans, args.bins))
                except Exception as exc:  # noqa: BLE001 - one failing device does not end the table
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"{size:>8} {label[:50]:50} {n_ch:>3} failed: {row['error']}")
                    results.append(row)
                    continue
                results.append(row)
                beside = row.get("python_speed_beside")
                beside = "" if beside is None else f"{beside:.2f}"
                live = "" if "live_update_s" not in row else f"{row['live_update_s'] * 1e3:.1f}"
                print(f"{size:>8} {label[:50]:50} {n_ch:>3} {row['first_s']:8.3f} {row['update_s'] * 1e3:10.2f} "
                      f"{row['per_channel_s'] * 1e3:10.2f} {filter_s * 1e3 / n_ch:10.2f} {beside:>9} {live:>8}",
                      flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(info=info, results=results), indent=1))
        print(f"JSON: {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
