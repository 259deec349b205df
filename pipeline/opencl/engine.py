"""OpenCL engine: a batch of compressed frames in, integrated patterns out.

Per batch: the compressed streams are packed into page-locked host memory,
copied to the device in one transfer, decoded by ``byte_offset.cl`` (three
launches for the whole batch, no host synchronisation in between), integrated
by ``integrate.cl`` straight from device memory, and only the patterns come
back.  Several slots (each with its own command queue and buffers) let the
copy of one batch overlap the kernels of another; the runner calls
``integrate_batch`` from ``concurrency`` threads.  Any OpenCL error is raised as
:class:`~pipeline.engines.EngineFailure` so the runner can redo the batch on
the CPU.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..cbf import CbfFrame, CorruptCbfError
from ..cbf_fast import HeaderTemplate, frames_from_run, warm_up
from ..engines import EngineFailure
from ..fastio import read_packed
from ..geometry import IntegrationSetup
from ..results import FrameResult

logger = logging.getLogger(__name__)

try:
    import pyopencl as cl
except ImportError as exc:  # pragma: no cover - reported by make_engine
    raise ImportError(f"pyopencl is not importable: {exc}") from exc

from .devices import find_device, list_devices  # noqa: E402,F401  (re-exported: engines.make_engine uses them)

KERNEL_DIR = Path(__file__).parent
CHUNK = 128
WRITE_WG = 32
SCAN_WG = 256
INT_WG = 128
ALIGN = 256


class PinnedArena:
    """Page-locked host memory cut into equal regions, each holding a run of whole CBF files back to back.

    A reader fills one region with a run of files (one compiled call, one release of the GIL for the run),
    and the device copies the run from there in one transfer at full PCIe speed: no second host copy and
    no pageable-memory staging by the driver.  A region goes back to the free list once every frame read
    into it has been released.
    """

    def __init__(self, ctx, device, regions: int, region_bytes: int):
        self.region_bytes = region_bytes
        self.regions = regions
        self.buffer = cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.ALLOC_HOST_PTR, regions * region_bytes)
        self._queue = cl.CommandQueue(ctx, device)
        self.host, _ = cl.enqueue_map_buffer(self._queue, self.buffer, cl.map_flags.READ | cl.map_flags.WRITE,
                                             0, (regions * region_bytes,), np.uint8)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(regions):
            self._free.put(i)

    def take(self, timeout: float = 0.05) -> int | None:
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            return None

    def give(self, index: int) -> None:
        self._free.put(index)

    def view(self, index: int) -> np.ndarray:
        start = index * self.region_bytes
        return self.host[start:start + self.region_bytes]


class _RegionUse:
    """Counts the frames still using an arena region; the last release frees it."""

    def __init__(self, arena: PinnedArena, index: int, users: int):
        self.arena, self.index, self.users = arena, index, users
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.arena.give(self.index)


class _Slot:
    """Buffers and a command queue for one batch in flight."""

    def __init__(self, engine: OpenCLEngine, index: int, profiling: bool = False):
        self.engine = engine
        self.index = index
        props = cl.command_queue_properties.PROFILING_ENABLE if profiling else 0
        self.queue = cl.CommandQueue(engine.ctx, engine.device, properties=props)
        self.events: dict[str, object] = {}
        # kernels hold their arguments: one set per slot keeps concurrent batches apart
        self.k = {name: cl.Kernel(engine.program, name)
                  for name in ("bo_count", "bo_scan", "bo_write", "csr_integrate")}
        self.capacity_raw = 0
        self.capacity_chunks = 0
        self.raw_dev = self.raw_pinned = self.raw_host = None
        self.seg = None
        n, nb = engine.batch_size, engine.setup.nbins
        mf = cl.mem_flags
        self.image = cl.Buffer(engine.ctx, mf.READ_WRITE, n * engine.setup.n_pixels * 4)
        self.out = cl.Buffer(engine.ctx, mf.WRITE_ONLY, n * 3 * nb * 4)
        self.out_pinned = cl.Buffer(engine.ctx, mf.READ_WRITE | mf.ALLOC_HOST_PTR, n * 3 * nb * 4)
        self.out_host, _ = cl.enqueue_map_buffer(self.queue, self.out_pinned, cl.map_flags.READ | cl.map_flags.WRITE,
                                                 0, (n, 3, nb), np.float32)
        self.offsets = cl.Buffer(engine.ctx, mf.READ_ONLY, n * 8)
        self.sizes = cl.Buffer(engine.ctx, mf.READ_ONLY, n * 4)
        self.errors = cl.Buffer(engine.ctx, mf.READ_WRITE, n * 4)
        # small transfers too come from page-locked memory: a read into pageable memory is
        # synchronous on some drivers (NVIDIA), and pyopencl holds the GIL while it waits
        self.offsets_host = self._pinned(n, np.int64)
        self.sizes_host = self._pinned(n, np.int32)
        self.errors_host = self._pinned(n, np.int32)

    def _pinned(self, n: int, dtype) -> np.ndarray:
        buf = cl.Buffer(self.engine.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.ALLOC_HOST_PTR,
                        n * np.dtype(dtype).itemsize)
        array, _ = cl.enqueue_map_buffer(self.queue, buf, cl.map_flags.READ | cl.map_flags.WRITE, 0, (n,), dtype)
        self._keep = getattr(self, "_keep", []) + [buf]
        return array

    def ensure(self, raw_bytes: int, chunks: int) -> None:
        """Grow the raw and segment buffers (rarely: sized for the largest batch seen)."""
        ctx, mf = self.engine.ctx, cl.mem_flags
        if raw_bytes > self.capacity_raw:
            size = int(raw_bytes * 1.25) + ALIGN
            self.raw_dev = cl.Buffer(ctx, mf.READ_ONLY, size)
            self.raw_pinned = cl.Buffer(ctx, mf.READ_WRITE | mf.ALLOC_HOST_PTR, size)
            self.raw_host, _ = cl.enqueue_map_buffer(self.queue, self.raw_pinned,
                                                     cl.map_flags.READ | cl.map_flags.WRITE, 0, (size,), np.uint8)
            self.capacity_raw = size
        if chunks > self.capacity_chunks:
            n = int(chunks * 1.25) + 64
            self.seg = [cl.Buffer(ctx, mf.READ_WRITE, n * 8), cl.Buffer(ctx, mf.READ_WRITE, n * 8)] + \
                       [cl.Buffer(ctx, mf.READ_WRITE, n * 4) for _ in range(4)]
            self.capacity_chunks = n


class OpenCLEngine:
    """Batched decode + integrate on an OpenCL device."""

    name = "opencl"

    def __init__(self, setup: IntegrationSetup, device=None, batch_size: int = 32, slots: int = 3,
                 pack_threads: int = 4, staging_frames: int | None = None, staging_bytes: int | None = None):
        self.setup = setup
        self.device = device if device is not None else find_device()
        if self.device is None:
            raise EngineFailure("no OpenCL device")
        self.batch_size = max(1, int(batch_size))
        self.concurrency = max(1, int(slots))
        self.timings: dict[str, float] = {"pack": 0.0, "gpu": 0.0, "frames": 0}
        try:
            self.ctx = cl.Context([self.device])
            self.program = self._build()
            self._upload_static()
            self._slots: queue.Queue = queue.Queue()
            for i in range(self.concurrency):
                self._slots.put(_Slot(self, i))
            n_pixels = setup.n_pixels
            # a byte-offset stream holds 1 byte a pixel for most Pilatus frames; room for 1.5 (a file that
            # does not fit is read into ordinary memory, which only costs speed)
            self.frame_bytes = staging_bytes or (n_pixels + n_pixels // 2 + 65536 + 4095) // 4096 * 4096
            self.arena = None
            self.reserve(staging_frames or 2 * self.concurrency + 2)
        except cl.Error as exc:
            raise EngineFailure(f"OpenCL set-up failed on {self.device.name}: {exc}") from exc
        self._template: HeaderTemplate | None = None  # header of the last frame parsed in full
        warm_up()  # compile the readers' nogil functions now, not when the first frames are waiting
        self._pack_pool = ThreadPoolExecutor(pack_threads, thread_name_prefix="xrdct-pack") if pack_threads else None
        self._lock = threading.Lock()

    @property
    def run_size(self) -> int:
        """Frames a reader should read in one go: a batch, so that a batch is one region and one copy."""
        return self.batch_size

    def reserve(self, runs: int) -> None:
        """Have page-locked room for ``runs`` runs in flight (readers + queue + batches); call between scans."""
        runs = max(int(runs), self.concurrency + 1)
        if self.arena is not None and self.arena.regions >= runs:
            return
        self.arena = PinnedArena(self.ctx, self.device, runs, self.batch_size * self.frame_bytes)
        # device copy of the arena: a pinned frame keeps its offset, so a run moves in one copy
        self.raw_mirror = cl.Buffer(self.ctx, cl.mem_flags.READ_ONLY, self.arena.host.nbytes)

    def close(self) -> None:
        """Stop the packing threads (device buffers go with the object)."""
        if self._pack_pool is not None:
            self._pack_pool.shutdown(wait=True)
            self._pack_pool = None

    @property
    def description(self) -> str:
        return (f"opencl: {self.device.name.strip()} ({self.device.platform.name.strip()}), "
                f"batch {self.batch_size}, {self.concurrency} slots")

    def _build(self):
        source = (KERNEL_DIR / "byte_offset.cl").read_text() + "\n" + (KERNEL_DIR / "integrate.cl").read_text()
        options = [f"-DCHUNK={CHUNK}", f"-DSCAN_WG={SCAN_WG}", f"-DINT_WG={INT_WG}", f"-DWRITE_WG={WRITE_WG}"]
        return cl.Program(self.ctx, source).build(options=options)

    def _upload_static(self) -> None:
        s = self.setup
        mf = cl.mem_flags
        ro = mf.READ_ONLY | mf.COPY_HOST_PTR

        def buf(a):
            return cl.Buffer(self.ctx, ro, hostbuf=np.ascontiguousarray(a))

        self.coef = buf(s.csr_data.astype(np.float32))
        self.indices = buf(s.csr_indices.astype(np.int32))
        self.indptr = buf(s.csr_indptr.astype(np.int32))
        self.norm = buf(s.norm.astype(np.float32))
        self.static_norm = buf(s.static_norm.astype(np.float64))
        self.static_count = buf(s.static_count.astype(np.float64))
        lo, hi, active = s.dummy_range
        self.dummy = (np.float32(lo), np.float32(hi), np.int32(1 if active else 0))
        self.poisson = np.int32(1 if s.config.error_model == "poisson" else 0)

    # -- public ---------------------------------------------------------------
    def load(self, path, check_md5: bool = False) -> CbfFrame:
        """Read one CBF file into page-locked memory (see :meth:`load_run`); raises its error."""
        result = self.load_run([path], check_md5)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def load_run(self, paths: list, check_md5: bool = False) -> list[CbfFrame | Exception]:
        """Read a run of CBF files back to back into one page-locked region.

        One compiled call reads them all with the GIL released; then the headers are parsed.  A file
        that is unreadable, malformed, or does not fit comes back as its exception (read once more
        through ordinary I/O, so that the error names the cause); the others are parsed frames whose
        ``release`` frees the region once all of them are done.
        """
        from ..cbf import CbfError, parse_frame, read_frame

        out: list = [None] * len(paths)
        index = self.arena.take(timeout=1.0)  # back-pressure: wait for a batch to free its region
        pinned: list[int] = []
        if index is not None:
            region = self.arena.view(index)
            offsets, got, _ = read_packed(paths, region)
            try:
                fast = frames_from_run(self._template, region, offsets, got, check_md5)
            except CbfError:  # an MD5 mismatch: let the full path below record it frame by frame
                fast = [None] * len(paths)
            base = index * self.arena.region_bytes
            for k in range(len(paths)):
                if got[k] < 0:
                    continue
                frame = fast[k]
                if frame is None:  # not like the last header seen: the full parser decides (and names errors)
                    try:
                        frame = parse_frame(memoryview(region[offsets[k]:offsets[k] + got[k]]), check_md5)
                    except CbfError as exc:
                        out[k] = exc
                        continue
                    self._template = HeaderTemplate(frame.header)
                frame.pinned = True
                frame.arena_offset = base + int(offsets[k]) + frame.header.binary_offset
                out[k] = frame
                pinned.append(k)
            if pinned:
                use = _RegionUse(self.arena, index, len(pinned))
                for k in pinned:
                    out[k].release = use.release
            else:
                self.arena.give(index)
        for k, path in enumerate(paths):
            if out[k] is None:  # not read above: ordinary memory (and the proper error if any)
                try:
                    out[k] = read_frame(path, check_md5)
                except (CbfError, OSError) as exc:
                    out[k] = exc
        return out

    def integrate_batch(self, frames: list[CbfFrame]) -> list[FrameResult | Exception]:
        return self._chunks(frames, integrate=True)

    def decode_batch(self, frames: list[CbfFrame]) -> list[np.ndarray | Exception]:
        """Decoded int32 images (for tests and checks; the pipeline never needs them on the host)."""
        return self._chunks(frames, integrate=False)

    def _chunks(self, frames: list[CbfFrame], integrate: bool) -> list:
        """All frames, ``batch_size`` at a time; their staging memory is given back only when every chunk
        succeeded: after an EngineFailure the caller redoes the whole list elsewhere from those bytes."""
        out: list = []
        for start in range(0, len(frames), self.batch_size):
            out.extend(self._run(frames[start:start + self.batch_size], integrate))
        for frame in frames:
            if frame.release is not None:
                frame.release()
                frame.release = None
        return out

    # -- internals ------------------------------------------------------------
    def _run(self, frames: list[CbfFrame], integrate: bool):
        setup = self.setup
        results: list = [None] * len(frames)
        good = []
        for i, f in enumerate(frames):
            if f.shape != setup.shape:
                results[i] = CorruptCbfError(f"frame shape {f.shape} differs from the detector's {setup.shape}")
            else:
                good.append(i)
        if not good:
            return results
        slot = self._slots.get()
        try:
            self._process(slot, [frames[i] for i in good], [(i, results) for i in good], integrate)
        except cl.Error as exc:
            # the frames' bytes stay valid (not released) for the CPU engine that redoes them
            raise EngineFailure(f"OpenCL error on {self.device.name}: {exc}") from exc
        finally:
            self._slots.put(slot)
        return results

    def _process(self, slot: _Slot, frames: list[CbfFrame], places, integrate: bool) -> None:
        setup = self.setup
        n = len(frames)
        sizes = np.array([f.header.binary_size for f in frames], dtype=np.int64)
        max_chunks = int((sizes.max() + CHUNK - 1) // CHUNK)
        all_pinned = all(getattr(f, "arena_offset", None) is not None for f in frames)
        q = slot.queue
        ev = slot.events
        t0 = time.perf_counter()
        if all_pinned:
            # decode where the frames already are: the device mirror of the page-locked arena
            offsets = np.array([f.arena_offset for f in frames], dtype=np.int64)
            slot.ensure(0, n * max_chunks)
            raw_buf = self.raw_mirror
            host = self.arena.host
            order = np.argsort(offsets)
            run_start = run_end = None
            for k in order:  # one copy per run of adjacent arena slots
                start, end = int(offsets[k]), int(offsets[k] + sizes[k])
                if run_end is not None and start - run_end < self.frame_bytes:
                    run_end = end
                    continue
                if run_end is not None:
                    ev["copy-in"] = cl.enqueue_copy(q, raw_buf, host[run_start:run_end], dst_offset=run_start,
                                                    is_blocking=False)
                run_start, run_end = start, end
            ev["copy-in"] = cl.enqueue_copy(q, raw_buf, host[run_start:run_end], dst_offset=run_start,
                                            is_blocking=False)
            t1 = time.perf_counter()
        else:
            offsets = np.zeros(n, dtype=np.int64)
            offsets[1:] = np.cumsum((sizes + ALIGN - 1) // ALIGN * ALIGN)[:-1]
            total = int(offsets[-1] + sizes[-1]) + 16
            slot.ensure(total, n * max_chunks)
            raw_buf = slot.raw_dev
            host = slot.raw_host

            def pack(k: int) -> None:
                host[offsets[k]:offsets[k] + sizes[k]] = np.frombuffer(frames[k].raw, dtype=np.uint8)

            if self._pack_pool is not None and n > 1:
                list(self._pack_pool.map(pack, range(n)))
            else:
                for k in range(n):
                    pack(k)
            t1 = time.perf_counter()
            ev["copy-in"] = cl.enqueue_copy(q, raw_buf, host[:total], is_blocking=False)
        slot.offsets_host[:n] = offsets
        slot.sizes_host[:n] = sizes
        slot.errors_host[:n] = 0
        cl.enqueue_copy(q, slot.offsets, slot.offsets_host, is_blocking=False)
        cl.enqueue_copy(q, slot.sizes, slot.sizes_host, is_blocking=False)
        cl.enqueue_copy(q, slot.errors, slot.errors_host, is_blocking=False)
        off_buf, size_buf, err_buf = slot.offsets, slot.sizes, slot.errors
        seg_start, seg_end, seg_count, seg_sum, seg_pos, seg_base = slot.seg
        mc = np.int32(max_chunks)
        gsize = ((max_chunks + 63) // 64 * 64, n)
        wsize = ((max_chunks + WRITE_WG - 1) // WRITE_WG * WRITE_WG, n)
        p = slot.k
        ev["decode:count"] = p["bo_count"](q, gsize, (64, 1), raw_buf, off_buf, size_buf, seg_start, seg_end,
                                           seg_count, seg_sum, err_buf, mc)
        ev["decode:scan"] = p["bo_scan"](q, (SCAN_WG * n,), (SCAN_WG,), seg_count, seg_sum, seg_pos, seg_base,
                                         err_buf, mc, np.int32(setup.n_pixels))
        ev["decode:write"] = p["bo_write"](q, wsize, (WRITE_WG, 1), raw_buf, off_buf, size_buf, seg_start,
                                           seg_end, seg_pos, seg_count, seg_base, slot.image, mc,
                                           np.int32(setup.n_pixels))
        errors = slot.errors_host[:n]
        if not integrate:
            cl.enqueue_copy(q, errors, err_buf, is_blocking=False)
        if integrate:
            nb = setup.nbins
            lo, hi, active = self.dummy
            ev["integrate"] = p["csr_integrate"](
                q, (nb * INT_WG, n), (INT_WG, 1), slot.image, np.int32(setup.n_pixels), self.coef, self.indices,
                self.indptr, self.norm, self.static_norm, self.static_count, lo, hi, active, self.poisson,
                np.float32(setup.empty), err_buf, slot.out, np.int32(nb))
            res = slot.out_host[:n]
            ev["copy-out"] = cl.enqueue_copy(q, res, slot.out, is_blocking=False)
            q.finish()
            poisson = bool(self.poisson)
            block = res.copy()  # one copy for the batch; each result is a view of it
            # a frame the decoder flagged comes back with count -1 (saves a read-back per batch)
            errors = (block[:, 2, 0] < 0).astype(np.int32)
            for k, (i, results) in enumerate(places):
                if errors[k]:
                    results[i] = self._explain(frames[k], errors[k])
                else:
                    results[i] = FrameResult(intensity=block[k, 0], sigma=block[k, 1] if poisson else None,
                                             count=block[k, 2])
        else:
            images = np.empty((n, setup.n_pixels), np.int32)
            cl.enqueue_copy(q, images, slot.image, is_blocking=True)
            q.finish()
            for k, (i, results) in enumerate(places):
                results[i] = self._explain(frames[k], errors[k]) if errors[k] else images[k].reshape(setup.shape)
        t2 = time.perf_counter()
        with self._lock:
            self.timings["pack"] += t1 - t0
            self.timings["gpu"] += t2 - t1
            self.timings["frames"] += n

    def profile(self, blobs: list[bytes], repeats: int = 5) -> dict[str, float]:
        """Milliseconds per frame of each stage, from OpenCL profiling events and host clocks."""
        from ..cbf import parse_frame

        t0 = time.perf_counter()
        frames = [parse_frame(b) for b in blobs]
        t_parse = (time.perf_counter() - t0) / len(frames)
        slot = _Slot(self, -1, profiling=True)
        stages: dict[str, list[float]] = {}
        for _ in range(repeats + 1):
            results: list = [None] * len(frames)
            t0 = time.perf_counter()
            self._process(slot, frames, [(i, results) for i in range(len(frames))], True)
            wall = time.perf_counter() - t0
            for name, event in slot.events.items():
                stages.setdefault(name, []).append((event.profile.end - event.profile.start) * 1e-9)
            stages.setdefault("batch wall", []).append(wall)
        n = len(frames)
        out = {name: 1e3 * float(np.median(v[1:])) / n for name, v in stages.items()}
        out["parse (host)"] = 1e3 * t_parse
        return out

    @staticmethod
    def _explain(frame: CbfFrame, flags: int) -> Exception:
        """A frame the device could not decode: let the CPU decoder name the exact problem."""
        from ..decode import decode

        try:
            decode(frame)
        except CorruptCbfError as exc:
            return exc
        return CorruptCbfError(f"device decoder flagged the stream (code {flags}) but the CPU decodes it")
