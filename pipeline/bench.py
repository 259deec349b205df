"""``xrdct bench``: our pipeline and the paper's reference pipelines on the same frames.

The references are the pipelines of Kieffer et al. (2018), Table 1 and
Appendix A, rebuilt with today's fabio/pyFAI/silx: sequential fabio read +
pyFAI integrate1d on the CPU or the GPU, a pool of fabio reader threads
feeding pyFAI, and silx's OpenCL ByteOffset feeding pyFAI's OpenCL CSR
engine.  All integrate the same frames with the same method and corrections
(no pixel splitting, CSR, 1000 bins, q in nm^-1, solid angle, Poisson
errors) and write the patterns to HDF5, as in the paper.  Each pipeline runs
``runs`` times; the table gives the median fps, the median absolute
deviation, and the ratio of ours to the best reference.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from .config import ReductionConfig
from .geometry import build_setup
from .simulate import SimulatedScan


def prepare_frames(workdir: Path, n_files: int, n_distinct: int, seed: int = 3) -> tuple[list[Path], SimulatedScan]:
    """``n_files`` CBF files made of ``n_distinct`` simulated frames (the page cache holds them all)."""
    sim = SimulatedScan(1, max(n_distinct, 2), seed=seed)
    workdir.mkdir(parents=True, exist_ok=True)
    blobs = [sim.cbf_bytes(i) for i in range(n_distinct)]
    files = []
    for i in range(n_files):
        path = workdir / f"bench_{i:06d}.cbf"
        if not path.exists() or path.stat().st_size != len(blobs[i % n_distinct]):
            path.write_bytes(blobs[i % n_distinct])
        files.append(path)
    return files, sim


def _write_results(h5file: Path, n: int, nbins: int):
    f = h5py.File(h5file, "w")
    return f, f.create_dataset("intensities", (n, nbins), dtype=np.float32)


# -- reference pipelines (paper, Appendix A) ----------------------------------------
def ref_sequential(files, ai, nbins, kwargs, out: Path) -> int:
    import fabio

    f, ds = _write_results(out, len(files), nbins)
    with f:
        for idx, name in enumerate(files):
            data = fabio.open(str(name)).data
            ds[idx] = ai.integrate1d(data, nbins, **kwargs).intensity
    return len(files)


def ref_pool(files, ai, nbins, kwargs, out: Path, workers: int) -> int:
    import fabio.cbfimage

    q_in: queue.Queue = queue.Queue()
    q_out: queue.Queue = queue.Queue(maxsize=4 * workers)

    def reader():
        while True:
            item = q_in.get()
            if item is None:
                return
            idx, name = item
            img = fabio.cbfimage.CbfImage()
            img.read(str(name), check_MD5=False)
            q_out.put((idx, img.data))

    pool = [threading.Thread(target=reader, daemon=True) for _ in range(workers)]
    for t in pool:
        t.start()
    for item in enumerate(files):
        q_in.put(item)
    for _ in pool:
        q_in.put(None)
    f, ds = _write_results(out, len(files), nbins)
    with f:
        for _ in files:
            idx, data = q_out.get()
            ds[idx] = ai.integrate1d(data, nbins, **kwargs).intensity
    for t in pool:
        t.join()
    return len(files)


class SilxPipeline:
    """Paper Fig. 7: silx ByteOffset decodes on the GPU, pyFAI's OpenCL CSR engine integrates."""

    def __init__(self, files, ai, nbins, kwargs):
        import fabio
        from silx.opencl.codec.byte_offset import ByteOffset

        data = fabio.open(str(files[0])).data
        res = ai.integrate1d(data, nbins, **kwargs)
        self.engine = ai.engines[res.method].engine
        self.bo = ByteOffset(os.path.getsize(files[0]), data.size, ctx=self.engine.ctx)
        self.nbins = nbins

    def run(self, files, out: Path) -> int:
        import fabio.cbfimage

        cbf = fabio.cbfimage.CbfImage()
        f, ds = _write_results(out, len(files), self.nbins)
        with f:
            for idx, name in enumerate(files):
                raw = cbf.read(str(name), only_raw=True)
                dec = self.bo(raw, as_float=True)
                ds[idx] = self.engine.integrate_ng(dec, solidangle=None).intensity
        return len(files)


# -- harness ----------------------------------------------------------------------
def timed(fn, runs: int) -> dict:
    fps = []
    for _ in range(runs):
        t0 = time.perf_counter()
        n = fn()
        fps.append(n / (time.perf_counter() - t0))
    med = statistics.median(fps)
    mad = statistics.median([abs(v - med) for v in fps])
    return {"fps": med, "mad": mad, "runs": fps}


LAST_STAGES: dict = {}


def run_ours(files_dir: Path, config: ReductionConfig, setup, engine, out: Path, readers: int,
             live_tomogram: dict | None = None, n_frames: int = 0) -> int:
    from .runner import Reducer
    from .scan import ScanModel

    scan = None
    if live_tomogram and n_frames % 100 == 0:  # the frames as a scan of 100 translations, tomograms kept live
        scan = ScanModel(n_frames // 100, 100)
    reducer = Reducer(config, files_dir, out, pattern=r"bench_(?P<frame>\d+)\.cbf$", live=False,
                      setup=setup, engine=engine, readers=readers, overwrite=True, scan=scan,
                      live_tomogram=live_tomogram)
    reducer.start()
    reducer.wait()
    m = reducer.snapshot()
    LAST_STAGES.clear()
    LAST_STAGES.update({k: 1e3 * v / max(m.frames_processed, 1) for k, v in reducer.stage_seconds.items()})
    LAST_STAGES["wall"] = 1e3 * m.elapsed / max(m.frames_processed, 1)
    if m.state != "done":
        raise RuntimeError(f"our pipeline ended in {m.state}: {m.message}")
    return m.frames_processed


def machine_info() -> dict:
    info = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import pyopencl as cl

        info["opencl"] = [f"{d.name.strip()} ({p.name.strip()})" for p in cl.get_platforms() for d in p.get_devices()]
    except Exception:
        info["opencl"] = []
    return info


def run_bench(args) -> int:
    import sys

    import pyFAI

    from .engines import make_engine

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    shm = Path("/dev/shm")
    need = args.frames * 2.6e6 * 1.3
    use_shm = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xrdct-bench-",
                                                                         dir=shm if use_shm else None))
    frames_dir = base / "frames"
    n_distinct = min(args.frames, 32)
    print(f"preparing {args.frames} frames ({n_distinct} distinct simulated Pilatus3 2M CdTe frames) in {frames_dir}")
    files, sim = prepare_frames(frames_dir, args.frames, n_distinct)
    ref_files = files[: args.ref_frames] if args.ref_frames else files
    nbins = args.bins
    config = ReductionConfig(poni_text=sim.poni_text, bins=nbins, unit="q_nm^-1", split="no",
                             engine="cpu", opencl_device=args.device, batch_size=(args.batch or [32])[0])
    setup = build_setup(config)
    ai = setup.integrator
    kwargs = setup.pyfai_kwargs()
    results: dict[str, dict] = {}
    only = set(args.only or [])

    def want(name: str) -> bool:
        return not only or any(name.startswith(o) for o in only)

    def record(name: str, fn, n_frames: int, **extra) -> None:
        try:
            fn()  # warm-up: compilation, page cache, engine set-up
            res = timed(fn, args.runs)
        except Exception as exc:  # a reference that cannot run here is reported, not fatal
            print(f"  {name:34s} skipped: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            return
        res.update(frames=n_frames, **extra)
        if name.startswith("ours"):
            res["busy_ms_per_frame"] = dict(LAST_STAGES)
        results[name] = res
        print(f"  {name:34s} {res['fps']:9.1f} fps  ± {res['mad']:.1f}")

    out = base / "out.h5"
    cpu_kwargs = dict(kwargs, method=("no", "csr", "cython"))
    gpu_device = None
    try:
        from .opencl.engine import find_device

        gpu_device = find_device(args.device, gpu_only=not args.device)
    except ImportError:
        pass
    readers_list = args.readers or [2, 4, 8]
    print("reference pipelines (Kieffer et al. 2018, Table 1), rebuilt with pyFAI", pyFAI.version)
    if want("seq-cpu-cpu"):
        record("seq-cpu-cpu", lambda: ref_sequential(ref_files, ai, nbins, cpu_kwargs, out), len(ref_files))
    for w in readers_list:
        if want(f"pool{w}-cpu"):
            record(f"pool{w}-cpu", lambda w=w: ref_pool(ref_files, ai, nbins, cpu_kwargs, out, w), len(ref_files))
    if gpu_device is not None:
        gpu_kwargs = dict(kwargs, method=("no", "csr", "opencl"))
        if want("seq-cpu-gpu"):
            record("seq-cpu-gpu", lambda: ref_sequential(ref_files, ai, nbins, gpu_kwargs, out), len(ref_files))
        for w in readers_list:
            if want(f"pool{w}-gpu"):
                record(f"pool{w}-gpu", lambda w=w: ref_pool(ref_files, ai, nbins, gpu_kwargs, out, w), len(ref_files))
        if want("silx-gpu"):
            try:
                silx = SilxPipeline(ref_files, ai, nbins, gpu_kwargs)
                record("silx-gpu", lambda: silx.run(ref_files, out), len(ref_files))
            except Exception as exc:
                results["silx-gpu"] = {"error": str(exc)}
                print(f"  silx-gpu skipped: {exc}")
    references = {k: v for k, v in results.items() if "fps" in v}

    print("ours (files in the page cache -> NeXus file, end to end)")
    ours: dict[str, dict] = {}
    if args.engine in ("cpu", "all") and want("ours-cpu"):
        cfg = ReductionConfig(**{**config.to_dict(), "engine": "cpu"})
        engine = make_engine(setup, cfg)
        record("ours-cpu", lambda: run_ours(frames_dir, cfg, setup, engine, base / "ours.h5", 2), len(files))
        ours["ours-cpu"] = results["ours-cpu"]
    if args.engine in ("opencl", "all") and want("ours-opencl"):
        from .opencl.engine import OpenCLEngine, find_device

        device = gpu_device or find_device(args.device)
        for batch in args.batch or [32]:
            for r in args.readers_ours or [8]:
                name = f"ours-opencl b{batch} r{r}"
                engine = OpenCLEngine(setup, device, batch_size=batch, slots=args.slots)
                cfg = ReductionConfig(**{**config.to_dict(), "engine": "opencl", "batch_size": batch})
                record(name, lambda cfg=cfg, engine=engine, r=r: run_ours(frames_dir, cfg, setup, engine,
                                                                          base / "ours.h5", r),
                       len(files), device=device.name.strip(), batch=batch, readers=r)
                if args.live_tomogram and "fps" in results[name] and not any("+live" in k for k in results):
                    # the same, with live tomograms of 3 peaks back-projected every 0.5 s beside the reduction
                    live = {"channels": 3, "interval": 0.5, "min_rotations": 2}
                    lname = name + " +live tomo"
                    record(lname, lambda cfg=cfg, engine=engine, r=r, live=live: run_ours(
                        frames_dir, cfg, setup, engine, base / "ours.h5", r, live, len(files)),
                        len(files), device=device.name.strip(), batch=batch, readers=r, live_tomogram=live)
                    ours[lname] = results[lname]
                if "fps" in results[name]:
                    t = engine.timings
                    results[name]["engine_ms_per_frame"] = {k: 1e3 * t[k] / max(t["frames"], 1)
                                                            for k in ("pack", "gpu")}
                    ours[name] = results[name]
                if args.profile and name not in results.get("_profiled", []):
                    results[name]["stages_ms_per_frame"] = engine.profile([p.read_bytes() for p in files[:batch]])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"machine": machine_info(), "frames": len(files), "reference_frames": len(ref_files), "bins": nbins,
               "runs": args.runs, "results": results, "peak_host_rss_mb": peak_rss}
    best_ref = max(references.items(), key=lambda kv: kv[1]["fps"]) if references else None
    print()
    print(f"{'pipeline':36s} {'fps':>10s} {'± MAD':>8s} {'x best ref':>11s}")
    for name, res in results.items():
        if "fps" not in res:
            continue
        ratio = res["fps"] / best_ref[1]["fps"] if best_ref else float("nan")
        print(f"{name:36s} {res['fps']:10.1f} {res['mad']:8.1f} {ratio:10.2f}x")
    if best_ref:
        print(f"best reference: {best_ref[0]} at {best_ref[1]['fps']:.1f} fps")
        summary["best_reference"] = best_ref[0]
        for res in ours.values():
            res["ratio_to_best_reference"] = res["fps"] / best_ref[1]["fps"]
        if "silx-gpu" in references:
            for res in ours.values():
                res["ratio_to_silx"] = res["fps"] / references["silx-gpu"]["fps"]
    print(f"peak host RSS {peak_rss:.0f} MB; machine: {summary['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
        print(f"JSON written to {args.json}")
    if not args.workdir and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0
