"""Wires the stages together and owns their threads.

    source --refs--> readers --frames--> engine workers --results--> assembler/writer

Every arrow is a bounded queue, so a slow stage holds the ones before it back
instead of filling memory.  A frame carries its hand-out number ``seq`` all
the way; the assembler restores that order once, writes, and publishes
metrics.  Nothing here imports Tango: the device server and ``xrdct reduce``
drive the same :class:`Reducer`.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cbf import CbfError, parse_header, read_frame
from .config import ReductionConfig
from .engines import EngineFailure, make_engine
from .geometry import IntegrationSetup, build_setup
from .nexus import STATUS_FAILED, STATUS_MISSING, STATUS_OK, NexusWriter, OutputError
from .results import FrameResult
from .scan import ScanModel
from .source import DEFAULT_PATTERN, FrameRef, LandingSource

logger = logging.getLogger(__name__)

_END = object()


class BoundedQueue:
    """A bounded FIFO made of two C-level SimpleQueues.

    ``queue.Queue`` wakes consumers through a pure-Python Condition, which at
    thousands of frames per second costs more GIL time than the work itself.
    Here a put takes a free-slot token first (blocking when the queue is full:
    back-pressure) and a get hands the token back.
    """

    def __init__(self, maxsize: int):
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(maxsize):
            self._tokens.put(None)

    def put(self, item, timeout: float | None = None) -> None:
        try:
            self._tokens.get(timeout=timeout)
        except queue.Empty:
            raise queue.Full from None
        self._items.put(item)

    def get(self, timeout: float | None = None):
        item = self._items.get(timeout=timeout)
        self._tokens.put(None)
        return item

    def get_nowait(self):
        return self.get(timeout=0)


@dataclass
class Metrics:
    """A consistent snapshot for clients (CLI progress, Tango attributes)."""

    state: str = "idle"
    message: str = ""
    frames_expected: int = 0
    frames_processed: int = 0
    frames_missing: int = 0
    frames_failed: int = 0
    frames_landed: int = 0
    backlog: int = 0
    throughput: float = 0.0
    latency: float = 0.0
    elapsed: float = 0.0
    engine: str = ""
    output_file: str = ""
    last_frame: int = -1
    frames_resumed: int = 0
    events: list = field(default_factory=list)


class _Rate:
    """Frames per second over a sliding window."""

    def __init__(self, window: float = 2.0):
        self.window = window
        self.times: collections.deque = collections.deque()

    def add(self, t: float, n: int = 1) -> None:
        for _ in range(n):
            self.times.append(t)

    def value(self, now: float) -> float:
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) < 2:
            return 0.0
        span = max(now - self.times[0], 1e-6)
        return len(self.times) / span


class Reducer:
    """One scan: landing directory in, NeXus file out.  Start/stop from any thread."""

    def __init__(self, config: ReductionConfig, landing: str | Path, output: str | Path,
                 scan: ScanModel | None = None, pattern: str = DEFAULT_PATTERN, live: bool = True,
                 missing_timeout: float = 5.0, poll_interval: float = 0.02, readers: int = 2,
                 setup: IntegrationSetup | None = None, engine=None, resume: bool = False,
                 overwrite: bool = False,
                 on_result: Callable[[int, FrameResult], None] | None = None,
                 on_event: Callable[[str, str], None] | None = None):
        self.config = config
        self.landing = landing
        self.output = Path(output)
        self.scan = scan
        self.pattern = pattern
        self.live = live
        self.missing_timeout = missing_timeout
        self.poll_interval = poll_interval
        self.readers = max(1, readers)
        self.setup = setup
        self.on_result = on_result
        self.on_event_cb = on_event
        self.metrics = Metrics(output_file=str(self.output))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drain = threading.Event()
        self._threads: list[threading.Thread] = []
        self._main: threading.Thread | None = None
        self._rate = _Rate()
        self._latencies: collections.deque = collections.deque(maxlen=200)
        self.stage_seconds: dict[str, float] = {"read": 0.0, "engine": 0.0, "write": 0.0}
        self.engine = engine
        self.resume = resume
        self.overwrite = overwrite
        self.last_result: tuple[int, FrameResult] | None = None
        self.error: BaseException | None = None
        self.t_start = 0.0
        self.t_end = 0.0

    # -- control -------------------------------------------------------------
    def start(self) -> None:
        """Begin in the background (geometry set-up included); returns at once."""
        if self._main is not None:
            raise RuntimeError("a Reducer runs once; make a new one")
        self._set_state("starting", "building the integrator")
        self._main = threading.Thread(target=self._run, name="xrdct-reducer", daemon=True)
        self._main.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the frames already landed, close the file.  True when done within ``timeout``."""
        self._drain.set()
        return self.wait(timeout)

    def abort(self, timeout: float | None = None) -> bool:
        """Stop at once; frames not yet reduced are not written."""
        self._drain.set()
        self._stop.set()
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        if self._main is None:
            return True
        self._main.join(timeout)
        return not self._main.is_alive()

    @property
    def running(self) -> bool:
        return self._main is not None and self._main.is_alive()

    def snapshot(self) -> Metrics:
        with self._lock:
            m = Metrics(**{k: getattr(self.metrics, k) for k in Metrics.__dataclass_fields__})
            m.events = list(self.metrics.events[-20:])
            latencies = list(self._latencies)
        source = getattr(self, "_source", None)
        if source is not None and m.state == "running":
            m.backlog += source.waiting
        now = time.time()
        m.latency = float(np.median(latencies)) if latencies else 0.0
        m.throughput = self._rate.value(now)
        m.elapsed = (self.t_end or now) - self.t_start if self.t_start else 0.0
        return m

    # -- internals -------------------------------------------------------------
    def _set_state(self, state: str, message: str = "") -> None:
        with self._lock:
            self.metrics.state = state
            self.metrics.message = message
        self._event("state", f"{state}: {message}" if message else state)

    def _busy(self, stage: str, seconds: float) -> None:
        """Accumulate the time a stage's threads spent working (not waiting on queues)."""
        with self._lock:
            self.stage_seconds[stage] += seconds

    def _event(self, kind: str, text: str) -> None:
        with self._lock:
            self.metrics.events.append((time.time(), kind, text))
            del self.metrics.events[:-200]
        logger.info("%s: %s", kind, text)
        if self.on_event_cb:
            try:
                self.on_event_cb(kind, text)
            except Exception:  # a client's callback never breaks the pipeline
                logger.exception("event callback failed")

    def _run(self) -> None:
        self.t_start = time.time()
        try:
            if self.setup is None:
                self.setup = build_setup(self.config, shape=self._probe_shape())
            if self.engine is None:
                self.engine = make_engine(self.setup, self.config, on_event=self._event)
                self._own_engine = True
            scan = self.scan
            with self._lock:
                self.metrics.engine = self.engine.description
                self.metrics.frames_expected = scan.n_frames if scan else 0
            self._pipeline(scan)
            self._set_state("done", self._summary())
        except BaseException as exc:  # reported as a fault with its reason
            self.error = exc
            logger.exception("reduction failed")
            self._set_state("fault", f"{type(exc).__name__}: {exc}")
        finally:
            self.t_end = time.time()
            if getattr(self, "_own_engine", False) and hasattr(self.engine, "close"):
                self.engine.close()  # an engine made here ends with the scan (its threads too)

    def _probe_shape(self) -> tuple[int, int] | None:
        """Frame shape for a PONI without a detector shape: from the first frame that has landed."""
        from .geometry import make_integrator

        if make_integrator(self.config.poni_text).detector.shape is not None:
            return None
        probe = LandingSource(self.landing, pattern=self.pattern, live=False)
        deadline = time.time() + self.missing_timeout
        while True:
            probe._update(time.time())
            for seen in sorted(probe._seen.items()):
                try:
                    with open(seen[1].path, "rb") as handle:
                        return parse_header(handle.read(65536)).shape
                except (CbfError, OSError):
                    continue
            if time.time() > deadline or self._drain.is_set():
                raise FileNotFoundError(f"no readable frame in {self.landing} to learn the frame shape from")
            time.sleep(self.poll_interval)

    def _summary(self) -> str:
        m = self.metrics
        return (f"{m.frames_processed} reduced, {m.frames_missing} missing, {m.frames_failed} failed "
                f"in {time.time() - self.t_start:.1f} s")

    def _pipeline(self, scan: ScanModel | None) -> None:
        setup = self.setup
        engine = self.engine
        depth = max(4, 2 * engine.batch_size)
        refs = BoundedQueue(depth * 2)
        # enough decoded-ready frames to keep every engine call fed, no more (they hold staging memory)
        frames = BoundedQueue(max(8, engine.batch_size * (engine.concurrency + 1)))
        results = BoundedQueue(depth * 4)
        source = self._source = LandingSource(
            self.landing, pattern=self.pattern, frames=scan.frames() if scan else None,
            first_frame=scan.first_frame if scan else None, live=self.live, poll_interval=self.poll_interval,
            missing_timeout=self.missing_timeout, on_event=self._event)
        if scan is None:
            scan = self._scan_from_listing(source)
            self.scan = scan
            with self._lock:
                self.metrics.frames_expected = scan.n_frames
        carried = None
        if self.resume:
            from .resume import recover

            carried = recover(self.output, self.config, scan)
        elif self.output.exists() and not self.overwrite:
            raise FileExistsError(f"{self.output} exists: results are not overwritten unless asked; "
                                  "give another name, resume it or overwrite it")
        writer = NexusWriter(self.output, setup.radial, setup.unit, scan, self.config.to_json(),
                             self.config.poni_text, engine.description)
        if carried is not None:
            for row, frame, result, src, landed in carried.results():
                writer.add(row, frame, result, STATUS_OK, src, landed)
            writer.flush()
            source.skip = set(int(f) for f in carried.frames)
            with self._lock:
                self.metrics.frames_processed = len(carried.frames)
                self.metrics.frames_resumed = len(carried.frames)
            self._event("resume", f"{len(carried.frames)} frames carried over from {carried.previous.name}; "
                                  "the others are reduced now")
        self._set_state("running", f"reducing into {self.output.name}")

        def put_ref(ref: FrameRef) -> None:
            with self._lock:
                self.metrics.frames_landed += 1
            while not self._stop.is_set():
                try:
                    refs.put(ref, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def source_loop() -> None:
            try:
                source.run(put_ref, self._stop, self._drain)
            except BaseException as exc:
                self._event("error", f"source failed: {exc}")
                self.error = exc
            finally:
                for _ in range(self.readers):
                    refs.put(_END)

        def reader_loop() -> None:
            while True:
                ref = refs.get()
                if ref is _END:
                    return
                item = (ref, None, ref.error)
                t0 = time.perf_counter()
                if ref.path is not None and ref.error is None:
                    load = getattr(self.engine, "load", None)
                    try:
                        if load is not None:
                            item = (ref, load(ref.path, self.config.check_md5), None)
                        else:
                            item = (ref, read_frame(ref.path, self.config.check_md5), None)
                    except (CbfError, OSError) as exc:
                        item = (ref, None, f"{type(exc).__name__}: {exc}")
                self._busy("read", time.perf_counter() - t0)
                frames.put(item)

        def engine_loop() -> None:
            while True:
                item = frames.get()
                if item is _END:
                    return
                batch = [item]
                while len(batch) < engine.batch_size:
                    try:
                        item = frames.get(timeout=0.002)
                    except queue.Empty:
                        break
                    if item is _END:
                        frames.put(_END)  # leave it for the loop that ends next
                        break
                    batch.append(item)
                for out in self._integrate(batch):
                    results.put(out)

        readers = [threading.Thread(target=reader_loop, name=f"xrdct-reader-{i}", daemon=True)
                   for i in range(self.readers)]
        workers = [threading.Thread(target=engine_loop, name=f"xrdct-engine-{i}", daemon=True)
                   for i in range(engine.concurrency)]

        def closer() -> None:
            """End each stage once the one before it has ended."""
            for t in readers:
                t.join()
            for _ in workers:
                frames.put(_END)
            for t in workers:
                t.join()
            results.put(_END)

        threads = [threading.Thread(target=source_loop, name="xrdct-source", daemon=True), *readers, *workers,
                   threading.Thread(target=closer, name="xrdct-closer", daemon=True)]
        for t in threads:
            t.start()
        self._threads = threads
        try:
            self._assemble(results, writer, refs, frames)
        except OutputError:
            with self._lock:  # what the file holds, not what was computed
                self.metrics.frames_processed = min(self.metrics.frames_processed, writer.committed)
            raise
        finally:
            self._stop.set()
            writer.close()
            for t in threads:
                t.join(timeout=5)
        if self.error is not None:
            raise self.error

    def _integrate(self, batch):
        """Run the engine on the decodable frames of a batch; fall back to the CPU on engine failure."""
        todo = [(i, frame) for i, (ref, frame, err) in enumerate(batch) if frame is not None]
        out = [(ref, None, err) for ref, frame, err in batch]
        if not todo:
            return out
        t0 = time.perf_counter()
        try:
            results = self.engine.integrate_batch([f for _, f in todo])
        except EngineFailure as exc:
            self._event("engine", f"{self.engine.name} failed ({exc}); redoing {len(todo)} frames on the CPU")
            from .cpu_engine import CpuEngine

            self.engine = CpuEngine(self.setup, workers=self.config.workers)
            with self._lock:
                self.metrics.engine = self.engine.description
            results = self.engine.integrate_batch([f for _, f in todo])
        self._busy("engine", time.perf_counter() - t0)
        for (i, _), res in zip(todo, results):
            ref = batch[i][0]
            if isinstance(res, BaseException):
                out[i] = (ref, None, f"{type(res).__name__}: {res}")
            else:
                out[i] = (ref, res, None)
        return out

    def _scan_from_listing(self, source: LandingSource) -> ScanModel:
        """Without a scan description: one line of all frames found (offline reduction)."""
        source._update(time.time())
        numbers = sorted(source._seen)
        if not numbers:
            raise FileNotFoundError(f"no frame matching the pattern in {self.landing}")
        first, last = numbers[0], numbers[-1]
        source.expected = list(range(first, last + 1))
        source._seen.clear()
        return ScanModel(1, last - first + 1, first_frame=first)

    def _assemble(self, results: queue.Queue, writer: NexusWriter, refs, frames) -> None:
        pending: dict[int, tuple] = {}
        next_seq = 0
        index_of = {f: i for i, f in enumerate(self.scan.frames())}
        while True:
            item = results.get()
            if item is _END:
                break
            ref, res, err = item
            pending[ref.seq] = (ref, res, err)
            while next_seq in pending:
                ref, res, err = pending.pop(next_seq)
                next_seq += 1
                now = time.time()
                if res is not None:
                    status = STATUS_OK
                elif ref.missing:
                    status = STATUS_MISSING
                else:
                    status = STATUS_FAILED
                    self._event("failed", f"frame {ref.frame}: {err}")
                row = index_of.get(ref.frame, ref.seq)
                t0 = time.perf_counter()
                writer.add(row, ref.frame, res, status, str(ref.path or ""), ref.landed)
                self._busy("write", time.perf_counter() - t0)
                with self._lock:
                    m = self.metrics
                    if status == STATUS_OK:
                        m.frames_processed += 1
                        self._latencies.append(now - ref.landed)
                    elif status == STATUS_MISSING:
                        m.frames_missing += 1
                    else:
                        m.frames_failed += 1
                    m.last_frame = ref.frame
                    done = m.frames_processed + m.frames_missing + m.frames_failed
                    m.backlog = max(0, m.frames_landed - done)
                if status == STATUS_OK:
                    self._rate.add(now)
                    self.last_result = (ref.frame, res)
                    if self.on_result:
                        try:
                            self.on_result(ref.frame, res)
                        except Exception:
                            logger.exception("result callback failed")
        writer.flush()
