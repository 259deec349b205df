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

from .cbf import CbfError, read_frame, read_header
from .config import ReductionConfig
from .engines import make_engine
from .geometry import IntegrationSetup, build_setup
from .nexus import STATUS_FAILED, STATUS_MISSING, STATUS_OK, NexusWriter, OutputError
from .results import FrameResult
from .scan import ScanModel
from .source import DEFAULT_PATTERN, FrameRef, LandingSource

logger = logging.getLogger(__name__)

_END = object()
MAX_RUNS_PER_BATCH = 4


def _discard_until_end(q, closer: threading.Thread) -> None:
    """Take results nobody will write until the last stage has ended (its end mark may be gone already)."""
    while True:
        try:
            if q.get(timeout=0.1) is _END:
                return
        except queue.Empty:
            if not closer.is_alive():
                return


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
                 missing_timeout: float = 5.0, poll_interval: float = 0.02, readers: int | None = None,
                 setup: IntegrationSetup | None = None, engine=None, resume: bool = False,
                 overwrite: bool = False, live_tomogram: dict | None = None,
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
        self.readers = readers  # None: chosen for the engine when the scan starts (see _reader_count)
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
        self.live_tomogram = live_tomogram  # LiveTomography options (channels, interval, device...); None: off
        self.live_tomo = None  # the LiveTomography of the scan running (or last run)
        self._failed_engines: list = []
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
            for engine in self._failed_engines:  # their calls are over now: their threads can go
                if hasattr(engine, "close"):
                    engine.close()
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
            for _, seen in sorted(probe._seen.items()):
                try:
                    return read_header(seen.path).shape
                except (CbfError, OSError):
                    continue
            if time.time() > deadline or self._drain.is_set():
                raise FileNotFoundError(f"no readable frame in {self.landing} to learn the frame shape from")
            time.sleep(self.poll_interval)

    def _summary(self) -> str:
        m = self.metrics
        return (f"{m.frames_processed} reduced, {m.frames_missing} missing, {m.frames_failed} failed "
                f"in {time.time() - self.t_start:.1f} s")

    def _reader_count(self) -> int:
        """Reader threads: given, or 8 for a GPU engine (page-cache reads scale to ~8 threads), 2 for the CPU."""
        if self.readers:
            return max(1, int(self.readers))
        from .engines import cpu_count

        return min(8, max(2, cpu_count())) if getattr(self.engine, "run_size", 1) > 1 else 2

    def _pipeline(self, scan: ScanModel | None) -> None:
        setup = self.setup
        engine = self.engine
        self.readers = self._reader_count()
        # Work moves in runs of frames, not single frames: every hand-off between threads costs a trip
        # through the GIL, and at thousands of frames a second those trips, not the work, set the pace.
        run_size = max(1, int(getattr(engine, "run_size", 1)))
        refs = BoundedQueue(2 * self.readers + 2)
        # enough decoded-ready runs to keep every engine call fed, no more (they hold staging memory)
        frames = BoundedQueue(max(2, engine.concurrency + 1) if run_size > 1 else
                              max(8, engine.batch_size * (engine.concurrency + 1)))
        results = BoundedQueue(4 * engine.concurrency + 4)
        reserve = getattr(engine, "reserve", None)
        if reserve is not None:  # staging room for every run that can be in flight at once
            reserve(self.readers + max(2, engine.concurrency + 1) + MAX_RUNS_PER_BATCH * engine.concurrency + 1)
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
        live = self.live_tomo = self._make_live(scan)
        writer = NexusWriter(self.output, setup.radial, setup.unit, scan, self.config.to_json(),
                             self.config.poni_text, engine.description, live=live)
        if live is not None:  # views, no copies: the writer stores a pattern before flagging it measured
            live.start(lambda: (writer.sinogram, writer.measured))
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
        pending_run: list[FrameRef] = []

        def hand_on() -> None:
            """Pass the refs gathered so far to the readers (a full run, or whatever there is when idle)."""
            if not pending_run:
                return
            run = pending_run[:]
            pending_run.clear()
            with self._lock:
                self.metrics.frames_landed += len(run)
            while not self._stop.is_set():
                try:
                    refs.put(run, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def put_ref(ref: FrameRef) -> None:
            pending_run.append(ref)
            if len(pending_run) >= run_size:
                hand_on()

        def source_loop() -> None:
            try:
                source.run(put_ref, self._stop, self._drain, idle=hand_on)
            except BaseException as exc:
                self._event("error", f"source failed: {exc}")
                self.error = exc
            finally:
                for _ in range(self.readers):
                    refs.put(_END)

        def read_run(run: list[FrameRef]) -> list[tuple]:
            """(ref, frame or None, error text or None) for each ref; never raises."""
            todo = [k for k, ref in enumerate(run) if ref.path is not None and ref.error is None]
            loaded: list = [None] * len(run)
            load_run = getattr(self.engine, "load_run", None)
            try:
                if load_run is not None and todo:
                    names = [run[k].where or run[k].path for k in todo]
                    for k, item in zip(todo, load_run(names, self.config.check_md5)):
                        loaded[k] = item
                else:
                    for k in todo:
                        try:
                            loaded[k] = read_frame(run[k].path, self.config.check_md5)
                        except (CbfError, OSError) as exc:
                            loaded[k] = exc
            except Exception as exc:  # a reader bug must cost the frames a clear error, never the thread
                logger.exception("reading a run of %d frames failed", len(run))
                loaded = [exc if k in todo and loaded[k] is None else loaded[k] for k in range(len(run))]
            out = []
            for ref, item in zip(run, loaded):
                if item is None:
                    out.append((ref, None, ref.error))
                elif isinstance(item, BaseException):
                    out.append((ref, None, f"{type(item).__name__}: {item}"))
                else:
                    out.append((ref, item, None))
            return out

        def reader_loop() -> None:
            while True:
                run = refs.get()
                if run is _END:
                    return
                t0 = time.perf_counter()
                items = read_run(run)
                self._busy("read", time.perf_counter() - t0)
                frames.put(items)

        def engine_loop() -> None:
            while True:
                items = frames.get()
                if items is _END:
                    return
                batch = list(items)
                runs = 1  # short runs (live mode) are merged, up to MAX_RUNS_PER_BATCH staging regions a batch
                while len(batch) < engine.batch_size and runs < MAX_RUNS_PER_BATCH:
                    try:
                        items = frames.get(timeout=0.002)
                    except queue.Empty:
                        break
                    if items is _END:
                        frames.put(_END)  # leave it for the loop that ends next
                        break
                    batch.extend(items)
                    runs += 1
                try:
                    out = self._integrate(batch)
                except Exception as exc:  # an engine bug fails these frames loudly; the scan goes on
                    logger.exception("integrating a batch of %d frames failed", len(batch))
                    out = [(ref, None, f"{type(exc).__name__}: {exc}") for ref, _, _ in batch]
                    for _, frame, _ in batch:
                        if frame is not None and frame.release is not None:
                            frame.release()
                            frame.release = None
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
            try:
                self._assemble(results, writer, refs, frames)
            except BaseException:
                # nobody reads the results any more: keep taking them so that every stage can finish
                # (engines blocked on a full queue would hold readers, the source and staging memory)
                self._stop.set()
                threading.Thread(target=_discard_until_end, args=(results, threads[-1]), name="xrdct-discard",
                                 daemon=True).start()
                raise
            if live is not None:  # a last tomogram from every rotation measured, into the file
                live.stop(timeout=10)
                if not self._stop.is_set():
                    live.update_now()
                writer.flush()
            self._stop.set()
            writer.close()  # raises OutputError when the last writes fail
        except OutputError:
            with self._lock:  # what the file holds, not what was computed
                self.metrics.frames_processed = min(self.metrics.frames_processed, writer.committed)
            raise
        finally:
            self._stop.set()
            if live is not None:
                live.stop(timeout=5)
            try:
                writer.close()  # after a failure: keeps the broken file open (see nexus), never raises again
            finally:
                for t in threads:
                    t.join(timeout=5)
        if self.error is not None:
            raise self.error

    def _make_live(self, scan: ScanModel):
        """The live tomography of this scan, or None (not asked for, or no tomography possible)."""
        if not self.live_tomogram:
            return None
        if scan.rotations < 2 or scan.translations < 2:
            self._event("tomogram", f"no live tomogram: the scan has {scan.rotations} rotations x "
                                    f"{scan.translations} translations")
            return None
        from .live_tomo import LiveTomography
        from .nexus import radial_name

        rname, runits = radial_name(self.setup.unit)
        # a short scan still gets its tomogram: wait for 4 rotations at most, or all of them when fewer
        options = {"min_rotations": min(4, scan.rotations), **self.live_tomogram}
        return LiveTomography(self.setup.radial, scan.rotations, scan.translations, radial_name=rname,
                              radial_units=runits, on_event=self._event, **options)

    def _integrate(self, batch):
        """Run the engine on the decodable frames of a batch; fall back to the CPU on engine failure."""
        todo = [(i, frame) for i, (ref, frame, err) in enumerate(batch) if frame is not None]
        out = [(ref, None, err) for ref, frame, err in batch]
        if not todo:
            return out
        t0 = time.perf_counter()
        used = self.engine
        try:
            results = used.integrate_batch([f for _, f in todo])
        except Exception as exc:  # EngineFailure, or anything else the failing engine raises meanwhile
            from .cpu_engine import CpuEngine

            with self._lock:  # the first worker to see the failure swaps the engine, once
                failed = used
                if not isinstance(self.engine, CpuEngine):
                    self._failed_engines.append(self.engine)
                    self.engine = CpuEngine(self.setup, workers=self.config.workers)
                    self.metrics.engine = self.engine.description
                    announce = True
                else:
                    announce = False
            if announce:
                self._event("engine", f"{failed.name} failed ({exc}); redoing its frames on the CPU from now on")
            if isinstance(failed, CpuEngine):
                raise
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

    def _assemble(self, results: BoundedQueue, writer: NexusWriter, refs, frames) -> None:
        """Restore frame order, write, and count; results come in lists (one per engine batch)."""
        pending: dict[int, tuple] = {}
        next_seq = 0
        index_of = {f: i for i, f in enumerate(self.scan.frames())}
        while True:
            items = results.get()
            if items is _END:
                break
            for item in items:
                pending[item[0].seq] = item
            done: list[tuple] = []
            while next_seq in pending:
                done.append(pending.pop(next_seq))
                next_seq += 1
            if done:
                self._write_in_order(done, writer, index_of)
        writer.flush()

    def _write_in_order(self, done: list[tuple], writer: NexusWriter, index_of: dict[int, int]) -> None:
        now = time.time()
        counts = {STATUS_OK: 0, STATUS_MISSING: 0, STATUS_FAILED: 0}
        latencies = []
        t0 = time.perf_counter()
        for ref, res, err in done:
            if res is not None:
                status = STATUS_OK
                latencies.append(now - ref.landed)
            elif ref.missing:
                status = STATUS_MISSING
            else:
                status = STATUS_FAILED
                self._event("failed", f"frame {ref.frame}: {err}")
            counts[status] += 1
            writer.add(index_of.get(ref.frame, ref.seq), ref.frame, res, status, ref.where or str(ref.path or ""),
                       ref.landed)
        self._busy("write", time.perf_counter() - t0)
        with self._lock:
            m = self.metrics
            m.frames_processed += counts[STATUS_OK]
            m.frames_missing += counts[STATUS_MISSING]
            m.frames_failed += counts[STATUS_FAILED]
            m.last_frame = done[-1][0].frame
            m.backlog = max(0, m.frames_landed - m.frames_processed - m.frames_missing - m.frames_failed)
            self._latencies.extend(latencies)
        if counts[STATUS_OK]:
            self._rate.add(now, counts[STATUS_OK])
            for ref, res, _ in reversed(done):
                if res is not None:
                    self.last_result = (ref.frame, res)
                    break
            if self.on_result:
                for ref, res, _ in done:
                    if res is None:
                        continue
                    try:
                        self.on_result(ref.frame, res)
                    except Exception:
                        logger.exception("result callback failed")
