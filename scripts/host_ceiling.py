"""How fast can the host side of the pipeline go if the device took no time?

Runs the real Reducer (source, readers, assembler, NeXus writer) on CBF files in
the page cache with an engine that reads frames like the OpenCL engine does
(into a staging arena through ``fastio``) and returns precomputed patterns.
The result is the ceiling the Python host side puts on the OpenCL engine.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.bench import prepare_frames
from pipeline.cbf import CbfFrame, parse_frame, parse_header
from pipeline.config import ReductionConfig
from pipeline.fastio import read_packed
from pipeline.geometry import build_setup
from pipeline.results import FrameResult
from pipeline.runner import Reducer


class HostOnlyEngine:
    """Reads runs of frames like the OpenCL engine (one region, one compiled call); computes nothing."""

    name = "host-only"

    def __init__(self, setup, batch_size=32, slots=3, header_only=False):
        self.setup = setup
        self.batch_size = self.run_size = batch_size
        self.concurrency = slots
        self.header_only = header_only
        self.description = f"host-only, batch {batch_size}"
        self.frame_bytes = (setup.n_pixels * 3 // 2 + 65536 + 4095) // 4096 * 4096
        self.regions = None
        self.block = np.ones((batch_size, 3, setup.nbins), np.float32)

    def reserve(self, runs):
        self.host = np.zeros((runs, self.batch_size * self.frame_bytes), np.uint8)
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(runs):
            self.free.put(i)

    def load_run(self, paths, check_md5=False):
        index = self.free.get()
        region = self.host[index]
        if self.header_only:  # leave the copy out: what remains is the Python cost per frame
            offsets = np.arange(len(paths)) * self.frame_bytes
            for k, path in enumerate(paths):
                with open(path, "rb", buffering=0) as handle:
                    handle.readinto(memoryview(region[offsets[k]:offsets[k] + 8192]))
            got = [2_600_000] * len(paths)
        else:
            offsets, got, _ = read_packed(paths, region)
        out = []
        users = [len(paths)]
        lock = threading.Lock()

        def release():
            with lock:
                users[0] -= 1
                if users[0] == 0:
                    self.free.put(index)

        for k in range(len(paths)):
            if self.header_only:
                header = parse_header(region[offsets[k]:offsets[k] + 8192].tobytes())
                frame = CbfFrame(header, memoryview(region)[offsets[k] + header.binary_offset:
                                                            offsets[k] + header.required_size])
            else:
                frame = parse_frame(memoryview(region[offsets[k]:offsets[k] + got[k]]), check_md5)
            frame.release = release
            frame.arena_offset = int(offsets[k]) + frame.header.binary_offset
            out.append(frame)
        return out

    def integrate_batch(self, frames):
        sizes = np.array([f.header.binary_size for f in frames], np.int64)  # noqa: F841  (what the engine does)
        block = self.block[:len(frames)].copy()
        out = []
        for k, f in enumerate(frames):
            out.append(FrameResult(block[k, 0], block[k, 1], block[k, 2]))
            if f.release is not None:
                f.release()
                f.release = None
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=1600)
    p.add_argument("--dir", default="/dev/shm/micro")
    p.add_argument("--readers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--header-only", action="store_true", help="read 8 KiB a file: Python costs only")
    args = p.parse_args()
    files, sim = prepare_frames(Path(args.dir), args.frames, 16)
    config = ReductionConfig(poni_text=sim.poni_text, bins=1000)
    setup = build_setup(config)
    for r in args.readers:
        fps = []
        for _ in range(args.runs):
            engine = HostOnlyEngine(setup, args.batch, header_only=args.header_only)
            red = Reducer(config, args.dir, "/dev/shm/host_ceiling.h5", pattern=r"bench_(?P<frame>\d+)\.cbf$",
                          live=False, setup=setup, engine=engine, readers=r, overwrite=True)
            t0 = time.perf_counter()
            red.start()
            red.wait()
            m = red.snapshot()
            assert m.state == "done", m.message
            fps.append(m.frames_processed / (time.perf_counter() - t0))
        stages = {k: round(1e3 * v / m.frames_processed, 4) for k, v in red.stage_seconds.items()}
        print(f"readers {r}: {np.median(fps):.0f} fps (runs {[round(f) for f in fps]}), busy ms/frame {stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
