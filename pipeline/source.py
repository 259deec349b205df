"""Landing directory: find frames, wait until they are whole, hand them on in order.

inotify does not see files written by another NFS client, so the directory is
polled.  A file counts once its binary section is all there (the header says
how long it is).  Frames leave in frame-number order; a frame that has not
come ``missing_timeout`` seconds after a later one did is recorded as missing
(or as failed, when a partial file stayed partial), so nothing waits forever
and nothing is silently skipped.  Every odd file is reported once.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .cbf import CbfError, IncompleteCbfError, read_header

logger = logging.getLogger(__name__)

DEFAULT_PATTERN = r"(?P<frame>\d+)\.cbf$"


@dataclass
class FrameRef:
    """A frame handed on by the source: a complete file, or a record of its absence."""

    seq: int  # hand-out order, 0, 1, 2... without gaps
    frame: int
    path: Path | None
    landed: float  # time.time() when it was seen complete (or declared missing)
    error: str | None = None  # missing / truncated / not a frame: why there is no data
    missing: bool = False
    where: str = ""  # the path as a string (readers and the writer need it so; a Path converts slowly)


@dataclass
class _Seen:
    path: Path
    size: int
    changed: float  # last time the size changed
    found: float = 0.0  # first time the file was seen
    complete: bool = False
    required: int | None = None
    error: str | None = None
    mtime_ns: int = -1
    where: str = ""  # the path as listed (compared as a string: cheaper than Path objects)


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad filename pattern {pattern!r}: {exc}") from exc
    if "frame" not in regex.groupindex and regex.groups < 1:
        raise ValueError("the filename pattern needs a group (?P<frame>...) giving the frame number")
    return regex


def frame_number(regex: re.Pattern, name: str) -> int | None:
    match = regex.search(name)
    if not match:
        return None
    try:
        return int(match.group("frame") if "frame" in regex.groupindex else match.group(1))
    except (TypeError, ValueError):
        return None


class LandingSource:
    """Polls a directory (or a glob) and emits :class:`FrameRef` in frame order.

    ``frames``: the frame numbers expected (a scan), or None to take whatever
    comes, starting at ``first_frame`` (default: the lowest number seen).
    ``live=False`` lists once and finishes (offline reduction).
    """

    def __init__(self, location: str | os.PathLike, pattern: str = DEFAULT_PATTERN,
                 frames: Iterable[int] | None = None, first_frame: int | None = None,
                 live: bool = True, poll_interval: float = 0.02, missing_timeout: float = 5.0,
                 on_event: Callable[[str, str], None] | None = None, skip_frames: Iterable[int] = ()):
        self.location = str(location)
        self.regex = compile_pattern(pattern)
        self.expected = sorted(set(frames)) if frames is not None else None
        self.first_frame = first_frame
        self.live = live
        self.poll_interval = poll_interval
        self.missing_timeout = missing_timeout
        self.on_event = on_event or (lambda kind, text: logger.info("%s: %s", kind, text))
        self.skip = set(skip_frames)  # already reduced (resume after a restart)
        self._seen: dict[int, _Seen] = {}
        self._reported: set[str] = set()
        # path -> (hand-out time, size, mtime_ns, frame), kept while the file is watched for being re-written
        self._emitted_paths: dict[str, tuple[float, int, int, int]] = {}
        self._settled: set[int] = set()  # frames handed on whose files are no longer watched
        self._done_frames: set[int] = set()
        self._dir_ok = True
        self.seq = 0
        self.waiting = 0
        self._list_seconds = 0.0
        self._cursor = 0
        self._next: int | None = None

    # -- listing -------------------------------------------------------------
    def _list(self) -> list[tuple[str, str]]:
        """(name, path) of the regular files, in name order (strings: no Path object per file and poll)."""
        if any(c in self.location for c in "*?["):
            found = sorted(glob.glob(self.location))
            for p in found:
                if os.path.islink(p):
                    self._report_link(os.path.basename(p))
            return [(os.path.basename(p), p) for p in found if not os.path.islink(p) and os.path.isfile(p)]
        try:
            with os.scandir(self.location) as entries:
                files = []
                for e in entries:
                    if e.is_symlink():
                        self._report_link(e.name)
                    elif e.is_file(follow_symlinks=False):
                        files.append((e.name, e.path))
            files.sort()
        except OSError as exc:
            if self._dir_ok:
                self.on_event("landing", f"landing directory unavailable: {exc}")
            self._dir_ok = False
            return []
        if not self._dir_ok:
            self.on_event("landing", "landing directory is back")
        self._dir_ok = True
        return files

    def _report_link(self, name: str) -> None:
        """Frames are read only from regular files: a symbolic link (which may point anywhere) is never opened."""
        self._report("link:" + name, "ignored", f"{name}: a symbolic link, not a file written by the detector; "
                     "ignored (frames are read only from regular files in the landing directory)")

    def _report(self, key: str, kind: str, text: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self.on_event(kind, text)

    def _forget_old(self, now: float) -> None:
        """Drop hand-out records past the re-write watch: a day-long scan must not grow memory per frame."""
        window = self._recheck_window
        if now - getattr(self, "_last_prune", 0.0) < min(5.0, window):
            return
        self._last_prune = now
        old = [(p, n) for p, (t, _, _, n) in self._emitted_paths.items() if now - t >= window]
        for p, number in old:
            del self._emitted_paths[p]
            self._settled.add(number)

    def _update(self, now: float) -> None:
        """One look at the directory.  Cheap per file for frames already handed on (regex + set lookups),
        so that a directory of a whole scan's frames can be polled often."""
        self._forget_old(now)
        t_list = time.perf_counter()
        listing = self._list()
        self._list_seconds = time.perf_counter() - t_list
        for name, where in listing:
            number = frame_number(self.regex, name)
            if number is None:
                self._report("name:" + name, "ignored", f"{name}: name does not match the frame pattern")
                continue
            if number in self.skip:  # reduced before a restart: expected to be there, not news
                continue
            if number in self._done_frames:
                if number in self._settled:  # handed on long ago; its file is no longer watched
                    continue
                emitted = self._emitted_paths.get(where)
                if emitted is None:
                    self._report("dup:" + name, "duplicate",
                                 f"{name}: frame {number} was already handed on; ignored")
                elif now - emitted[0] < self._recheck_window:
                    self._check_rewritten(Path(where), number, emitted)
                continue
            if self.expected is None:
                first = self._next if self._next is not None else self.first_frame
                if first is not None and number < first:
                    # without a scan, nothing below the frame due can be handed on any more
                    self._report("late:" + name, "ignored",
                                 f"{name}: frame {number} comes before frame {first}, which was due; ignored")
                    continue
            if self.expected is not None and not self._in_scan(number):
                self._report("out:" + name, "ignored", f"{name}: frame {number} is outside the scan")
                continue
            seen = self._seen.get(number)
            if seen is not None and seen.where != where:
                self._report("dup:" + name, "duplicate",
                             f"{name}: frame {number} already comes from {seen.path.name}; ignored")
                continue
            if not self.live:  # offline: nothing is being written; the reader validates the whole file anyway
                if seen is None:
                    self._seen[number] = _Seen(Path(where), -1, now, found=now, complete=True, where=where)
                continue
            try:
                st = os.stat(where, follow_symlinks=False)
            except OSError:
                continue
            size = st.st_size
            if seen is None:
                seen = self._seen[number] = _Seen(Path(where), size, now, found=now, where=where)
            elif size != seen.size:
                seen.size, seen.changed = size, now
            seen.mtime_ns = st.st_mtime_ns
            if not seen.complete:
                self._check_complete(seen)

    @property
    def _recheck_window(self) -> float:
        """How long after hand-out a file is watched for being re-written."""
        return max(1.0, 2 * self.missing_timeout)

    def _check_rewritten(self, path: Path, number: int, emitted: tuple[float, int, int, int]) -> None:
        try:
            st = path.stat()
        except OSError:
            return
        if (st.st_size, st.st_mtime_ns) != emitted[1:3]:
            self._report("rewritten:" + path.name, "duplicate",
                         f"{path.name}: frame {number} was re-written after it was handed on; ignored")

    def _in_scan(self, number: int) -> bool:
        import bisect

        i = bisect.bisect_left(self.expected, number)
        return i < len(self.expected) and self.expected[i] == number

    def _check_complete(self, seen: _Seen) -> None:
        if seen.required is None:
            try:
                seen.required = read_header(seen.where or seen.path).required_size
                seen.error = None
            except IncompleteCbfError as exc:
                seen.error = f"incomplete: {exc}"
                return
            except CbfError as exc:  # garbage with a frame-like name: a failed frame, right away
                seen.error = f"not a usable CBF: {exc}"
                seen.complete = True
                return
            except OSError as exc:
                seen.error = f"unreadable: {exc}"
                return
        if seen.size >= seen.required:
            seen.complete = True
            seen.error = None  # a file that grew to its full size is no longer truncated
        else:
            seen.error = f"truncated: {seen.size} of {seen.required} bytes"

    # -- hand-out ------------------------------------------------------------
    def _next_number(self) -> int | None:
        """Frame number expected next, or None when the scan is complete."""
        if self.expected is not None:
            while self._cursor < len(self.expected) and self.expected[self._cursor] in self.skip:
                self._cursor += 1
            return self.expected[self._cursor] if self._cursor < len(self.expected) else None
        if self._next is None:
            if not self._seen:
                return None
            self._next = self.first_frame if self.first_frame is not None else min(self._seen)
        while self._next in self.skip:
            self._next += 1
        return self._next

    def _advance(self) -> None:
        if self.expected is not None:
            self._cursor += 1
        else:
            self._next += 1

    def _emit(self, put, number: int, now: float, error: str | None, missing: bool) -> None:
        seen = self._seen.pop(number, None)
        path = seen.path if seen else None
        ref = FrameRef(self.seq, number, path if not missing else None, now, error, missing,
                       seen.where if seen is not None and not missing else "")
        self.seq += 1
        self._done_frames.add(number)
        if path is not None:
            self._emitted_paths[seen.where] = (now, seen.size, seen.mtime_ns, number)
        if error:
            self.on_event("missing" if missing else "failed", f"frame {number}: {error}")
        put(ref)
        self._advance()

    def _later_seen(self, number: int) -> float | None:
        """When the first frame after ``number`` was seen, or None when none has been."""
        times = [s.found for n, s in self._seen.items() if n > number]
        return min(times) if times else None

    def run(self, put: Callable[[FrameRef], None], stop: threading.Event, drain: threading.Event | None = None,
            idle: Callable[[], None] | None = None) -> None:
        """Emit frames through ``put`` until the scan is done or ``stop`` is set.

        ``drain`` (set by a Stop): hand on what has landed, declare the gaps
        before the last landed frame missing, and finish without waiting.
        ``idle`` is called whenever nothing more can be handed on for now (before
        each wait, and at the end), so that a caller grouping frames into runs
        never holds one back.
        """
        try:
            self._run(put, stop, drain, idle or (lambda: None))
        finally:
            if idle is not None:
                idle()

    def _run(self, put, stop, drain, idle) -> None:
        self._cursor = 0
        self._next = None
        drain = drain or threading.Event()
        while not stop.is_set():
            now = time.time()
            self._update(now)
            # a huge directory takes long to list: then look less often instead of listing all the time
            # (the listing only: header reads of new files grow with the pause and must not lengthen it)
            pause = min(max(self.poll_interval, 2.0 * self._list_seconds), max(self.poll_interval, 0.5),
                        max(self.poll_interval, self.missing_timeout / 4))
            finishing = drain.is_set() or not self.live
            while True:
                number = self._next_number()
                if number is None:
                    if self.expected is not None or finishing:
                        return
                    break
                seen = self._seen.get(number)
                if seen is not None and seen.complete:
                    self._emit(put, number, now, seen.error, False)
                    continue
                later = self._later_seen(number)
                if finishing:
                    if later is None:
                        if seen is not None and not self.live:
                            self._emit(put, number, now, seen.error or "incomplete", False)
                            continue
                        if seen is None and not self.live and self.expected is not None:
                            # offline: the directory is all there will be
                            self._emit(put, number, now, "missing (never landed)", True)
                            continue
                        return
                    self._emit(put, number, now, (seen.error or "incomplete") if seen else "missing (never landed)",
                               seen is None)
                    continue
                if later is None and seen is None:
                    break
                # The clock runs from when a later frame came (not from when this one became due, so a
                # run of missing frames is declared at once) and from the last growth of a partial file;
                # a partial file that stopped growing times out even when no later frame exists.
                quiet = now - max(later or 0.0, seen.changed if seen else 0.0)
                if quiet < self.missing_timeout:
                    break
                if seen is not None:
                    self._emit(put, number, now, seen.error or "incomplete after time-out", False)
                else:
                    self._emit(put, number, now, f"missing (not landed {self.missing_timeout:g} s after later frames)",
                               True)
            # landed and complete but not handed on yet (waiting for an earlier frame): part of the backlog
            self.waiting = sum(1 for s in self._seen.values() if s.complete)
            idle()
            stop.wait(pause)
