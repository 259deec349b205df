"""Host-side micro-benchmarks on the GPU machine: file reads into ordinary/pinned memory, parsing, enqueue costs."""
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.bench import prepare_frames
from pipeline.cbf import parse_frame

files, sim = prepare_frames(Path("/dev/shm/micro"), 1600, 16)
size = max(p.stat().st_size for p in files[:16])


def run(nthreads, fn):
    chunks = [files[i::nthreads] for i in range(nthreads)]
    t0 = time.perf_counter()
    th = [threading.Thread(target=lambda c=c, k=k: [fn(p, k) for p in c]) for k, c in enumerate(chunks)]
    [t.start() for t in th]
    [t.join() for t in th]
    return len(files) / (time.perf_counter() - t0)


bufs = [np.empty(size + 4096, np.uint8) for _ in range(32)]


def read_bytes(p, k):
    p.read_bytes()


def readinto_np(p, k):
    with open(p, "rb", buffering=0) as f:
        f.readinto(memoryview(bufs[k]))


def readinto_parse(p, k):
    with open(p, "rb", buffering=0) as f:
        n = f.readinto(memoryview(bufs[k]))
    parse_frame(memoryview(bufs[k][:n]))


for name, fn in [("read_bytes", read_bytes), ("readinto numpy", readinto_np), ("readinto+parse", readinto_parse)]:
    print(name, {n: round(run(n, fn)) for n in (1, 4, 8, 16)})


from pipeline.config import ReductionConfig  # noqa: E402
from pipeline.geometry import build_setup  # noqa: E402
from pipeline.opencl.engine import OpenCLEngine, find_device  # noqa: E402

setup = build_setup(ReductionConfig(poni_text=sim.poni_text, bins=1000))
eng = OpenCLEngine(setup, find_device(), batch_size=64, slots=3)
arena = eng.arena


def readinto_pinned(p, k):
    idx = arena.take()
    try:
        with open(p, "rb", buffering=0) as f:
            f.readinto(memoryview(arena.view(idx)[:size]))
    finally:
        arena.give(idx)


def load(p, k):
    fr = eng.load(p)
    fr.release()


print("readinto pinned", {n: round(run(n, readinto_pinned)) for n in (1, 4, 8, 16)})
print("engine.load", {n: round(run(n, load)) for n in (1, 4, 8, 16)})
t = time.perf_counter()
for p in files[:500]:
    parse_frame(p.read_bytes())
print("read+parse one thread fps", 500 / (time.perf_counter() - t))
frames = [parse_frame(p.read_bytes()) for p in files[:64]]
eng.integrate_batch(frames)
t = time.perf_counter()
for _ in range(10):
    eng.integrate_batch(frames)
print("integrate_batch 64 unpinned frames, one thread: fps", 640 / (time.perf_counter() - t))
pinned = eng.load_run(files[:64])  # one staging region for the batch
t = time.perf_counter()
for _ in range(10):
    for f in pinned:
        f.release = None
    eng.integrate_batch(pinned)
print("integrate_batch 64 pinned frames, one thread: fps", 640 / (time.perf_counter() - t))
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

with ThreadPoolExecutor(3) as pool:
    t = time.perf_counter()
    list(pool.map(lambda _: eng.integrate_batch(pinned), range(30)))
print("integrate_batch pinned, 3 threads: fps", 30 * 64 / (time.perf_counter() - t))
print("sys.getswitchinterval", sys.getswitchinterval(), "cores", os.cpu_count())
