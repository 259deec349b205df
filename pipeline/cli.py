"""The ``xrdct`` command: simulate, reduce, bench, demo (and serve/panel when installed)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import __version__


def _config_from_args(args) -> ReductionConfig:  # noqa: F821
    from .config import SPLIT_ALIASES, ReductionConfig, normalise_unit

    return ReductionConfig.from_files(
        args.poni, mask_path=args.mask, bins=args.bins, unit=normalise_unit(args.unit),
        split=SPLIT_ALIASES.get(args.split, args.split), polarization=args.polarization,
        solid_angle=not args.no_solid_angle, engine=args.engine, opencl_device=args.device,
        workers=args.workers, check_md5=args.check_md5, batch_size=args.batch,
        error_model=args.error_model)


def _add_reduction_options(p: argparse.ArgumentParser, poni_required: bool = True) -> None:
    p.add_argument("--poni", required=poni_required, help="pyFAI geometry (PONI file)")
    p.add_argument("--mask", help="mask file (EDF, TIFF, NPY, or HDF5 as file.h5::/path); non-zero = masked")
    p.add_argument("--bins", type=int, default=1000, help="number of radial bins (default 1000)")
    p.add_argument("--unit", default="q_nm^-1", help="q_nm^-1 (default), q_A^-1 or 2th_deg")
    p.add_argument("--split", default="no", choices=["no", "bbox", "full", "none", "pixel"],
                   help="pixel splitting (default no)")
    p.add_argument("--polarization", type=float, default=None, help="polarization factor in [-1, 1] (default: none)")
    p.add_argument("--no-solid-angle", action="store_true", help="do not correct for the solid angle")
    p.add_argument("--error-model", default="poisson", choices=["poisson", "none"])
    p.add_argument("--engine", default="auto", choices=["auto", "cpu", "opencl"])
    p.add_argument("--device", default=None, help="OpenCL device: index 'P:D' or part of its name")
    p.add_argument("--workers", type=int, default=0, help="CPU engine threads (default: one per core)")
    p.add_argument("--batch", type=int, default=32, help="frames per OpenCL launch (default 32)")
    p.add_argument("--check-md5", action="store_true", help="verify each file's Content-MD5")


def _progress(reducer, stream=None, stop: threading.Event | None = None) -> None:
    """A one-line progress bar on a terminal, periodic lines otherwise."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    last = 0.0
    while reducer.running and not (stop and stop.is_set()):
        m = reducer.snapshot()
        done = m.frames_processed + m.frames_missing + m.frames_failed
        total = m.frames_expected or 0
        if m.state == "running" and (tty or time.time() - last > 2.0):
            frac = done / total if total else 0.0
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            line = (f"[{bar}] {done}/{total} frames  {m.throughput:7.1f} fps  missing {m.frames_missing}"
                    f"  failed {m.frames_failed}")
            stream.write(("\r" + line) if tty else line + "\n")
            stream.flush()
            last = time.time()
        time.sleep(0.2)
    if tty:
        stream.write("\n")


def _live_tomogram_options(args) -> dict | None:
    """LiveTomography options from ``--live-tomogram N`` (strongest peaks) or ``A:B`` bin ranges."""
    spec = getattr(args, "live_tomogram", None)
    if not spec:
        return None
    opts: dict = {"interval": args.live_interval, "device": args.tomo_device}
    if all(part.isdigit() for part in spec):
        opts["channels"] = int(spec[0]) if len(spec) == 1 else [(int(spec[0]), int(spec[1]))]
    else:
        try:
            opts["channels"] = [tuple(int(v) for v in part.split(":")) for part in spec]
        except ValueError:
            raise SystemExit(f"--live-tomogram: give a channel count or bin ranges START:STOP, not {spec}") from None
    return opts


def cmd_reduce(args) -> int:
    from .runner import Reducer
    from .scan import ScanModel
    from .source import DEFAULT_PATTERN

    config = _config_from_args(args)
    source = args.source
    scan = ScanModel.parse(args.scan, order=args.order, first_frame=args.first_frame) if args.scan else None
    reducer = Reducer(config, source, args.output, scan=scan, pattern=args.pattern or DEFAULT_PATTERN,
                      live=args.live, missing_timeout=args.timeout, readers=args.readers, resume=args.resume,
                      overwrite=args.overwrite, live_tomogram=_live_tomogram_options(args))
    reducer.start()
    try:
        _progress(reducer)
        reducer.wait()
    except KeyboardInterrupt:
        print("\ninterrupted: finishing the frames already read", file=sys.stderr)
        reducer.abort(30)
    m = reducer.snapshot()
    if args.tomogram and m.state == "done":
        import h5py

        from .preview import strongest_bins
        from .tomo import write_tomograms

        if args.tomogram == "all":
            bins = "all"
        else:
            with h5py.File(args.output, "r") as f:
                bins = strongest_bins(f["entry/sinogram/intensity"][()])
        tomos = write_tomograms(args.output, bins=bins)
        print(f"tomograms of {len(tomos.images)} channels written to {args.output}:/entry/tomogram", file=sys.stderr)
    fps = (m.frames_processed - m.frames_resumed) / m.elapsed if m.elapsed else 0.0
    summary = {"output": str(args.output), "frames": m.frames_processed, "resumed": m.frames_resumed,
               "missing": m.frames_missing,
               "failed": m.frames_failed, "seconds": round(m.elapsed, 3), "fps": round(fps, 1), "engine": m.engine}
    print(json.dumps(summary) if args.json else
          f"{m.frames_processed} frames reduced, {m.frames_missing} missing, {m.frames_failed} failed "
          f"in {m.elapsed:.2f} s ({fps:.1f} fps, {m.engine}) -> {args.output}")
    if m.state == "fault":
        print(f"error: {m.message}", file=sys.stderr)

        return 2
    return 0


def cmd_simulate(args) -> int:
    from .simulate import Player, SimulatedScan

    sim = SimulatedScan(args.rotations, args.translations, seed=args.seed, counts=args.counts)
    out = Path(args.outdir)
    files = sim.write_support_files(args.support_dir or out)
    print(f"geometry {files['poni']}, mask {files['mask']}", file=sys.stderr)
    frames = list(sim.scan.frames())
    skip = set(args.skip or [])
    if args.rate > 0:
        print(f"preparing {len(frames)} frames...", file=sys.stderr)
        sim.prepare(frames)
    player = Player(sim, out, rate=args.rate, frames=frames, partial=args.partial, skip=skip)
    t0 = time.perf_counter()
    player.run()
    dt = time.perf_counter() - t0
    if player.error:
        raise player.error
    print(f"wrote {player.written} frames ({sim.rotations}x{sim.translations}) to {out} in {dt:.2f} s"
          f" ({player.written / dt:.1f} fps)")
    return 0


def cmd_demo(args) -> int:
    """Simulate a short scan and reduce it (the Tango issue upgrades this to the device server)."""
    try:
        from tango_ds.demo import run_demo
    except ImportError:
        run_demo = None
    if run_demo is not None and not args.no_tango:
        return run_demo(args)
    from .config import ReductionConfig
    from .runner import Reducer
    from .simulate import Player, SimulatedScan

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xrdct-demo-"))
    landing, output = work / "landing", work / "output"
    if landing.exists():
        shutil.rmtree(landing)
    landing.mkdir(parents=True)
    output.mkdir(parents=True, exist_ok=True)
    sim = SimulatedScan(args.rotations, args.translations, seed=1)
    files = sim.write_support_files(work)
    print(f"simulating a {sim.rotations}x{sim.translations} XRD-CT scan of a 3-phase phantom...")
    sim.prepare()
    config = ReductionConfig(poni_text=files["poni"].read_text(), mask_path=str(files["mask"]), bins=args.bins,
                             polarization=0.99, engine=args.engine)
    out_file = output / "demo_scan.h5"
    reducer = Reducer(config, landing, out_file, scan=sim.scan, live=True, missing_timeout=2.0, overwrite=True)
    reducer.start()
    while reducer.snapshot().state == "starting":
        time.sleep(0.05)
    player = Player(sim, landing, rate=args.rate)
    print(f"detector writing {sim.n_frames} frames at {args.rate:g} fps into {landing}")
    player.start()
    _progress(reducer, sys.stdout)
    reducer.wait()
    m = reducer.snapshot()
    print(f"reduced {m.frames_processed}/{m.frames_expected} frames (missing {m.frames_missing},"
          f" failed {m.frames_failed}) with {m.engine}; median latency {m.latency * 1e3:.0f} ms")
    from .preview import save_demo_pictures

    pictures = save_demo_pictures(out_file, work)
    print(f"NeXus file: {out_file}\nsinogram picture: {pictures['sinogram']}\n"
          f"tomogram picture: {pictures['tomogram']}")
    return 0 if m.state == "done" and m.frames_processed == sim.n_frames else 1


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xrdct", description="Real-time XRD-CT reduction of Pilatus CBF frames")
    parser.add_argument("--version", action="version", version=f"xrdct {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reduce", help="reduce a directory or glob of CBF frames into a NeXus file")
    p.add_argument("source", help="landing directory or glob of CBF files")
    p.add_argument("-o", "--output", required=True, help="output NeXus (HDF5) file")
    _add_reduction_options(p)
    p.add_argument("--scan", help="scan shape NROTxNTRANS (default: one line of all frames)")
    p.add_argument("--order", default="row", choices=["row", "snake", "column"], help="acquisition order")
    p.add_argument("--first-frame", type=int, default=0, help="number of the scan's first frame")
    p.add_argument("--pattern", help=r"filename regex with a (?P<frame>\d+) group (default '(?P<frame>\d+)\.cbf$')")
    p.add_argument("--live", action="store_true", help="keep watching the directory until the scan is complete")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before a frame is declared missing")
    p.add_argument("--readers", type=int, default=None,
                   help="file reader threads (default: 8 with a GPU engine, 2 with the CPU engine)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted OUT.h5: its reduced frames are kept (the old file is moved "
                        "aside), the others are reduced")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.h5 if it exists")
    p.add_argument("--tomogram", choices=["peaks", "all"],
                   help="at the end, add tomograms to OUT.h5: of the strongest peaks (one per phase where the "
                        "phases differ in space), or of every bin")
    p.add_argument("--live-tomogram", nargs="+", metavar="N|START:STOP",
                   help="keep tomograms in OUT.h5:/entry/tomogram_live up to date while the scan runs: of the N "
                        "strongest peaks, or of the bin ranges given")
    p.add_argument("--live-interval", type=float, default=2.0, help="seconds between live tomogram updates")
    p.add_argument("--tomo-device", default=None,
                   help="back-projector for live tomograms: cpu, opencl or a device name (default: a GPU if any)")
    p.set_defaults(func=cmd_reduce)

    p = sub.add_parser("soak", help="simulated detector at a fixed rate for minutes: check every frame, memory, "
                                     "latency")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=250.0, help="frames per second")
    p.add_argument("--detector", default="pilatus300k", choices=["pilatus300k", "pilatus2m"])
    p.add_argument("--engine", default="auto", choices=["auto", "cpu", "opencl"])
    p.add_argument("--bins", type=int, default=1000)
    p.add_argument("--readers", type=int, default=None)
    p.add_argument("--workdir", help="where the landing directory and NeXus file go (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the frames (default: deleted once reduced)")
    p.add_argument("--json", help="write the report (with per-second samples) here")
    p.add_argument("--live-tomogram", type=int, default=0, metavar="N",
                   help="keep live tomograms of N peaks during the soak (0: off)")
    p.set_defaults(func=lambda args: __import__("pipeline.soak", fromlist=["main"]).main(args))

    p = sub.add_parser("faults", help="inject each fault of the reliability list, count frames lost/duplicated")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", nargs="*", help="scenarios whose name contains one of these words")
    p.add_argument("--json", help="write the table as JSON here")
    p.set_defaults(func=lambda args: __import__("pipeline.faults", fromlist=["main"]).main(args))

    p = sub.add_parser("simulate", help="write a synthetic XRD-CT scan as Pilatus3 2M CdTe CBF files")
    p.add_argument("outdir")
    p.add_argument("--rotations", type=int, default=8)
    p.add_argument("--translations", type=int, default=10)
    p.add_argument("--rate", type=float, default=0.0, help="frames per second (0: as fast as possible)")
    p.add_argument("--partial", action="store_true", help="write each file in pieces, as NFS readers see it")
    p.add_argument("--skip", type=int, nargs="*", help="frame numbers never written (missing frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--counts", type=float, default=300.0, help="mean counts of a strong ring pixel")
    p.add_argument("--support-dir", help="where to put geometry.poni and mask.edf (default: OUTDIR)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="simulate a short scan and reduce it live (needs nothing else)")
    p.add_argument("--workdir", help="where to put the scan and the results (default: a new temp folder)")
    p.add_argument("--rotations", type=int, default=8)
    p.add_argument("--translations", type=int, default=12)
    p.add_argument("--rate", type=float, default=250.0)
    p.add_argument("--bins", type=int, default=1000)
    p.add_argument("--engine", default="auto", choices=["auto", "cpu", "opencl"])
    p.add_argument("--no-tango", action="store_true", help="drive the pipeline directly, without the device server")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="our pipeline against the paper's reference pipelines on the same frames")
    p.add_argument("--frames", type=int, default=64, help="synthetic frames held in memory")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--bins", type=int, default=1000)
    p.add_argument("--engine", default="cpu", choices=["cpu", "opencl", "all"])
    p.add_argument("--device", default=None)
    p.add_argument("--ref-frames", type=int, default=0, help="frames for the reference pipelines (default: all)")
    p.add_argument("--readers", type=int, nargs="*", default=None, help="pool sizes of the reference pipeline")
    p.add_argument("--readers-ours", type=int, nargs="*", default=None, help="our reader threads to scan (OpenCL)")
    p.add_argument("--batch", type=int, nargs="*", default=None, help="OpenCL batch sizes to scan")
    p.add_argument("--slots", type=int, default=3, help="OpenCL batches in flight")
    p.add_argument("--profile", action="store_true", help="also time each OpenCL stage with profiling events")
    p.add_argument("--keep", action="store_true", help="keep the frames and outputs")
    p.add_argument("--switch-interval", type=float, default=0.0, help="Python GIL switch interval in s (default 5e-3)")
    p.add_argument("--only", nargs="*", help="run only these pipelines")
    p.add_argument("--live-tomogram", action="store_true",
                   help="also run ours (OpenCL) with live tomograms (frames as a scan of 100 translations)")
    p.add_argument("--workdir", help="where the frames are written (default /dev/shm or a temp folder)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.set_defaults(func=cmd_bench)

    try:
        from tango_ds.cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"xrdct: error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``xrdct`` command: main(), then leave (skipping HDF5's exit clean-up only if a file failed)."""
    from .nexus import leave_without_hdf5_cleanup

    rc = main()
    leave_without_hdf5_cleanup(rc)  # only when an output file failed to write: HDF5 would crash at exit
    sys.exit(rc)


if __name__ == "__main__":
    run()
