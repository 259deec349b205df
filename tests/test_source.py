"""Landing-directory source: polling, pattern, order, completeness, time-outs, duplicates, odd files.

Every test drives ``LandingSource.run(put, stop, drain)`` in a thread on small real CBF files
(7 x 13 pixels written by fabio) and checks the FrameRefs it hands on and the events it reports.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cbf import is_complete, parse_header, read_frame
from pipeline.source import DEFAULT_PATTERN, FrameRef, LandingSource, compile_pattern, frame_number

pytestmark = pytest.mark.timeout(30)

SHAPE = (7, 13)
TIMEOUT = 0.4  # missing-frame time-out used by the live tests
POLL = 0.01


@functools.cache
def cbf_bytes(seed: int, shape: tuple[int, int] = SHAPE) -> bytes:
    """A small real CBF file (fabio), different for every seed."""
    import fabio.cbfimage

    data = np.random.default_rng(seed).integers(-2, 5000, size=shape).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f.cbf")
        fabio.cbfimage.CbfImage(data=data).write(path)
        return Path(path).read_bytes()


def truncated(data: bytes, missing: int = 10) -> bytes:
    """The file cut ``missing`` bytes short of the end of its binary section."""
    required = parse_header(data).required_size
    assert required <= len(data)
    return data[: required - missing]


def name(frame: int, prefix: str = "frame_") -> str:
    return f"{prefix}{frame:05d}.cbf"


def land(directory: Path, frame: int, seed: int | None = None, prefix: str = "frame_") -> Path:
    """Write a whole frame file (as the detector would)."""
    path = directory / name(frame, prefix)
    path.write_bytes(cbf_bytes(frame if seed is None else seed))
    return path


class Harness:
    """Runs a LandingSource in a thread and records what it hands on and reports."""

    def __init__(self, location, **kwargs):
        self.refs: list[FrameRef] = []
        self.events: list[tuple[str, str]] = []
        self.put_times: list[float] = []
        self.on_put = kwargs.pop("on_put", None)
        kwargs.setdefault("poll_interval", POLL)
        kwargs.setdefault("missing_timeout", TIMEOUT)
        self.source = LandingSource(location, on_event=lambda kind, text: self.events.append((kind, text)), **kwargs)
        self.stop = threading.Event()
        self.drain = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _put(self, ref: FrameRef) -> None:
        if self.on_put:
            self.on_put(ref)
        self.put_times.append(time.monotonic())
        self.refs.append(ref)

    def _run(self) -> None:
        try:
            self.source.run(self._put, self.stop, self.drain)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def start(self) -> Harness:
        self.thread.start()
        return self

    def wait_for(self, n: int, timeout: float = 5.0) -> list[FrameRef]:
        deadline = time.monotonic() + timeout
        while len(self.refs) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(self.refs) >= n, f"only {len(self.refs)} of {n} frames handed on: {self.refs}"
        return self.refs

    def wait_event(self, kind: str, contains: str = "", timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for k, text in list(self.events):
                if k == kind and contains in text:
                    return text
            time.sleep(0.005)
        raise AssertionError(f"no {kind!r} event containing {contains!r}: {self.events}")

    def join(self, timeout: float = 5.0) -> list[FrameRef]:
        """Wait for the source to finish by itself."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"source did not finish; handed on {self.refs}"
        if self.error:
            raise self.error
        return self.refs

    def finish(self, timeout: float = 5.0) -> list[FrameRef]:
        """Drain (a Stop): hand on what landed and end."""
        self.drain.set()
        return self.join(timeout)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)

    def kinds(self, kind: str) -> list[str]:
        return [text for k, text in self.events if k == kind]


@pytest.fixture
def landing(tmp_path) -> Path:
    path = tmp_path / "landing"
    path.mkdir()
    return path


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(location, **kwargs) -> Harness:
        h = Harness(location, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def assert_sequence(refs: list[FrameRef], frames: list[int]) -> None:
    """Frame order as expected and hand-out numbers 0, 1, 2... without gaps."""
    assert [r.frame for r in refs] == frames
    assert [r.seq for r in refs] == list(range(len(refs)))


def assert_good(ref: FrameRef, directory: Path) -> None:
    """A frame handed on whole: a complete file, no error, and the content of its own frame."""
    assert ref.error is None and not ref.missing
    assert ref.path is not None and ref.path.parent == directory
    assert is_complete(ref.path)
    assert ref.path.read_bytes() == cbf_bytes(ref.frame)


# -- pattern -------------------------------------------------------------------------------------------


def test_default_pattern_yields_frame_number():
    regex = compile_pattern(DEFAULT_PATTERN)
    assert frame_number(regex, "scan3_frame_00042.cbf") == 42
    assert frame_number(regex, "00007.cbf") == 7
    assert frame_number(regex, "frame_00042.cbf.part") is None
    assert frame_number(regex, "frame_00042.edf") is None
    assert frame_number(regex, "notes.txt") is None


def test_pattern_with_unnamed_group_and_custom_names():
    regex = compile_pattern(r"^img_(\d+)_master\.cbf$")
    assert frame_number(regex, "img_12_master.cbf") == 12
    assert frame_number(regex, "img_12.cbf") is None
    named = compile_pattern(r"run(?P<run>\d+)_(?P<frame>\d+)\.cbf$")
    assert frame_number(named, "run7_000123.cbf") == 123


@pytest.mark.parametrize("pattern", [r"(\d+\.cbf", r"\d+\.cbf$"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match="pattern"):
        compile_pattern(pattern)
    with pytest.raises(ValueError):
        LandingSource("/nonexistent", pattern=pattern)


def test_frame_group_that_is_not_a_number_gives_none():
    regex = compile_pattern(r"(?P<frame>[a-z]+)\.cbf$")
    assert frame_number(regex, "abc.cbf") is None


def test_custom_pattern_selects_files(landing, harness):
    for frame in range(3):
        land(landing, frame, prefix="scanA_")
        land(landing, frame + 10, prefix="scanB_")
    h = harness(landing, pattern=r"^scanA_(?P<frame>\d+)\.cbf$", live=False).start()
    refs = h.join()
    assert_sequence(refs, [0, 1, 2])
    ignored = h.kinds("ignored")
    assert sorted(ignored) == sorted(f"{name(f + 10, 'scanB_')}: name does not match the frame pattern"
                                     for f in range(3))


# -- order and completeness ------------------------------------------------------------------------------


def test_in_order_scan_finishes_by_itself(landing, harness):
    h = harness(landing, frames=range(5)).start()
    for frame in range(5):
        land(landing, frame)
        time.sleep(0.01)
    refs = h.join()
    assert_sequence(refs, list(range(5)))
    for ref in refs:
        assert_good(ref, landing)
    assert not h.kinds("missing") and not h.kinds("failed")


def test_out_of_order_arrival_is_handed_on_in_frame_order(landing, harness):
    order = [4, 2, 0, 5, 3, 1]
    h = harness(landing, frames=range(6), missing_timeout=5.0).start()
    for frame in order:
        land(landing, frame)
        time.sleep(0.03)  # several polls between arrivals
    refs = h.join()
    assert_sequence(refs, sorted(order))
    for ref in refs:
        assert_good(ref, landing)


def test_frame_waits_for_an_earlier_one(landing, harness):
    """Frame 1 present, frame 0 not yet: nothing is handed on until frame 0 comes."""
    h = harness(landing, frames=range(2), missing_timeout=5.0).start()
    land(landing, 1)
    time.sleep(0.2)
    assert h.refs == []
    land(landing, 0)
    assert_sequence(h.join(), [0, 1])


def _slow_writer(path: Path, data: bytes, pieces: int, pause: float) -> threading.Thread:
    def write():
        step = -(-len(data) // pieces)
        with open(path, "wb") as handle:
            for start in range(0, len(data), step):
                handle.write(data[start:start + step])
                handle.flush()
                time.sleep(pause)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_slowly_written_file_is_taken_only_when_complete(landing, harness):
    """A file growing in pieces with pauses (as NFS shows it) is handed on whole and without error."""
    data = cbf_bytes(1)
    sizes_at_put: dict[int, int] = {}

    def on_put(ref):
        if ref.path is not None:
            sizes_at_put[ref.frame] = ref.path.stat().st_size

    h = harness(landing, frames=range(3), on_put=on_put).start()
    land(landing, 0)
    # pauses shorter than the time-out but many polls long; frame 2 lands meanwhile
    writer = _slow_writer(landing / name(1), data, pieces=6, pause=0.08)
    time.sleep(0.05)
    land(landing, 2)
    refs = h.join()
    writer.join()
    assert_sequence(refs, [0, 1, 2])
    for ref in refs:
        assert_good(ref, landing)
    assert sizes_at_put[1] == len(data)
    assert not h.kinds("failed")


def test_slow_writers_in_parallel_out_of_order(landing, harness):
    h = harness(landing, frames=range(4)).start()
    writers = [_slow_writer(landing / name(f), cbf_bytes(f), pieces=4, pause=0.05 + 0.02 * (3 - f))
               for f in (3, 1, 2, 0)]
    refs = h.join()
    for w in writers:
        w.join()
    assert_sequence(refs, [0, 1, 2, 3])
    for ref in refs:
        assert_good(ref, landing)


def test_truncated_file_is_failed_after_the_time_out(landing, harness):
    data = cbf_bytes(1)
    h = harness(landing, frames=range(3)).start()
    land(landing, 0)
    (landing / name(1)).write_bytes(truncated(data))  # binary section cut short
    land(landing, 2)
    t0 = time.monotonic()
    refs = h.join()
    assert_sequence(refs, [0, 1, 2])
    bad = refs[1]
    assert not bad.missing and bad.path == landing / name(1)
    assert bad.error is not None and "truncated" in bad.error
    assert h.put_times[1] - t0 >= TIMEOUT * 0.9  # not before the time-out
    assert_good(refs[0], landing)
    assert_good(refs[2], landing)
    assert any("frame 1" in text and "truncated" in text for text in h.kinds("failed"))


def test_file_with_header_only_is_failed_after_the_time_out(landing, harness):
    data = cbf_bytes(1)
    marker = data.find(b"\x0c\x1a\x04\xd5")
    h = harness(landing, frames=range(3)).start()
    land(landing, 0)
    (landing / name(1)).write_bytes(data[: marker // 2])  # not even the binary marker
    land(landing, 2)
    refs = h.join()
    assert_sequence(refs, [0, 1, 2])
    assert refs[1].error and "incomplete" in refs[1].error and not refs[1].missing


def test_empty_file_is_failed_after_the_time_out(landing, harness):
    h = harness(landing, frames=range(2)).start()
    (landing / name(0)).write_bytes(b"")
    land(landing, 1)
    refs = h.join()
    assert_sequence(refs, [0, 1])
    assert refs[0].error and not refs[0].missing
    assert refs[1].error is None


def test_truncated_last_frame_is_failed_after_the_time_out(landing, harness):
    """No later frame will ever come: a partial file that stopped growing must not block the scan."""
    data = cbf_bytes(2)
    h = harness(landing, frames=range(3)).start()
    land(landing, 0)
    land(landing, 1)
    (landing / name(2)).write_bytes(truncated(data, 1))
    refs = h.join(timeout=TIMEOUT * 10)
    assert_sequence(refs, [0, 1, 2])
    assert refs[2].error and "truncated" in refs[2].error and not refs[2].missing


def test_growing_file_is_not_failed_while_it_grows(landing, harness):
    """Growth restarts the clock: pauses shorter than the time-out, total longer than it."""
    data = cbf_bytes(1)
    h = harness(landing, frames=range(3)).start()
    land(landing, 0)
    land(landing, 2)
    writer = _slow_writer(landing / name(1), data, pieces=6, pause=TIMEOUT * 0.4)  # ~2.4 time-outs in all
    refs = h.join(timeout=10)
    writer.join()
    assert_sequence(refs, [0, 1, 2])
    for ref in refs:
        assert_good(ref, landing)


# -- missing frames -------------------------------------------------------------------------------------


def test_missing_frame_is_declared_after_the_time_out(landing, harness):
    h = harness(landing, frames=range(5)).start()
    for frame in (0, 1, 3):
        land(landing, frame)
    t_later = time.monotonic()
    h.wait_for(2)
    time.sleep(TIMEOUT / 2)
    assert len(h.refs) == 2  # frame 2 still awaited
    land(landing, 4)
    refs = h.join()
    assert_sequence(refs, [0, 1, 2, 3, 4])
    gap = refs[2]
    assert gap.missing and gap.path is None and gap.error and "missing" in gap.error
    assert h.put_times[2] - t_later >= TIMEOUT * 0.9
    for ref in refs[:2] + refs[3:]:
        assert_good(ref, landing)
    assert len(h.kinds("missing")) == 1 and "frame 2" in h.kinds("missing")[0]


def test_run_of_missing_frames_is_declared_together(landing, harness):
    """Frames 1-4 never come; each must not wait a time-out of its own after the one before."""
    h = harness(landing, frames=range(6)).start()
    land(landing, 0)
    land(landing, 5)
    t0 = time.monotonic()
    refs = h.join()
    assert_sequence(refs, list(range(6)))
    assert [r.missing for r in refs] == [False, True, True, True, True, False]
    assert h.put_times[-1] - t0 < 2 * TIMEOUT, "consecutive missing frames each waited a full time-out"
    assert len(h.kinds("missing")) == 4


def test_frame_arriving_after_it_was_declared_missing_is_reported(landing, harness):
    h = harness(landing).start()  # live, no scan: runs until drained
    land(landing, 0)
    land(landing, 2)
    refs = h.wait_for(3)
    assert_sequence(refs, [0, 1, 2])
    assert refs[1].missing
    land(landing, 1)  # too late
    text = h.wait_event("duplicate", name(1))
    assert "already handed on" in text
    time.sleep(0.1)
    assert len(h.refs) == 3  # not handed on a second time
    assert_sequence(h.finish(), [0, 1, 2])


def test_gaps_are_declared_missing_on_drain(landing, harness):
    h = harness(landing, missing_timeout=30.0).start()  # no scan, time-out far away
    for frame in (0, 1, 3, 6):
        land(landing, frame)
    h.wait_for(2)
    time.sleep(0.05)
    assert len(h.refs) == 2
    refs = h.finish()
    assert_sequence(refs, [0, 1, 2, 3, 4, 5, 6])
    assert [r.frame for r in refs if r.missing] == [2, 4, 5]
    assert all(r.path is None and "never landed" in r.error for r in refs if r.missing)
    assert len(h.kinds("missing")) == 3


def test_drain_does_not_wait_for_frames_still_to_come(landing, harness):
    h = harness(landing, frames=range(10), missing_timeout=30.0).start()
    for frame in (0, 1, 2):
        land(landing, frame)
    h.wait_for(3)
    t0 = time.monotonic()
    refs = h.finish()
    assert time.monotonic() - t0 < 1.0
    assert_sequence(refs, [0, 1, 2])  # frames after the last landed one are not declared missing


def test_stop_ends_at_once(landing, harness):
    h = harness(landing, frames=range(10), missing_timeout=30.0).start()
    land(landing, 0)
    land(landing, 5)
    h.wait_for(1)
    t0 = time.monotonic()
    h.stop.set()
    h.join()
    assert time.monotonic() - t0 < 1.0
    assert_sequence(h.refs, [0])


# -- duplicates -----------------------------------------------------------------------------------------


def test_same_frame_in_two_files_is_taken_once(landing, harness):
    land(landing, 0)
    first = land(landing, 1, prefix="a_")
    land(landing, 1, seed=99, prefix="b_")  # the same frame number in a second file, seen in the same poll
    land(landing, 2)
    h = harness(landing, frames=range(3)).start()
    refs = h.join()
    assert_sequence(refs, [0, 1, 2])
    assert refs[1].path == first and refs[1].error is None
    dups = h.kinds("duplicate")
    assert len(dups) == 1 and name(1, "b_") in dups[0] and name(1, "a_") in dups[0]


def test_second_file_after_hand_on_is_reported_once(landing, harness):
    h = harness(landing, frames=range(3)).start()
    land(landing, 0)
    h.wait_for(1)
    land(landing, 0, seed=7, prefix="again_")
    h.wait_event("duplicate", name(0, "again_"))
    time.sleep(0.1)  # many polls: still reported once
    land(landing, 1)
    land(landing, 2)
    refs = h.join()
    assert_sequence(refs, [0, 1, 2])
    assert refs[0].path == landing / name(0)
    assert len(h.kinds("duplicate")) == 1


def test_file_rewritten_after_hand_on_is_reported_not_handed_on_again(landing, harness):
    h = harness(landing, frames=range(2)).start()
    path = land(landing, 0)
    h.wait_for(1)
    time.sleep(0.02)
    path.write_bytes(cbf_bytes(1234))  # the detector (or a user) writes the file again
    text = h.wait_event("duplicate", name(0))
    assert "re-written" in text
    land(landing, 1)
    refs = h.join()
    assert_sequence(refs, [0, 1])
    assert len(h.kinds("duplicate")) == 1


# -- files that are not frames -----------------------------------------------------------------------


def test_garbage_with_a_frame_name_is_failed_at_once(landing, harness):
    """Not a CBF at all: no need to wait for the (long) time-out."""
    rng = np.random.default_rng(5)
    h = harness(landing, frames=range(3), missing_timeout=30.0).start()
    land(landing, 0)
    (landing / name(1)).write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    land(landing, 2)
    refs = h.join(timeout=5.0)
    assert_sequence(refs, [0, 1, 2])
    assert refs[1].error and "not a usable CBF" in refs[1].error and not refs[1].missing
    assert refs[1].path == landing / name(1)
    assert any("frame 1" in text for text in h.kinds("failed"))


def test_cbf_with_unsupported_compression_is_failed(landing, harness):
    data = cbf_bytes(3).replace(b"x-CBF_BYTE_OFFSET", b"x-CBF_PACKED", 1)
    h = harness(landing, frames=range(2), missing_timeout=30.0).start()
    (landing / name(0)).write_bytes(data)
    land(landing, 1)
    refs = h.join()
    assert_sequence(refs, [0, 1])
    assert refs[0].error and "compression" in refs[0].error
    assert refs[1].error is None


def test_names_not_matching_are_reported_once_and_skipped(landing, harness):
    odd = ["notes.txt", name(1) + ".part", "frame_.cbf", "frame_00002.CBF.tmp"]
    for n in odd:
        (landing / n).write_bytes(b"whatever")
    (landing / "subdir_00003.cbf").mkdir()  # a directory with a frame-like name is not a file
    h = harness(landing, frames=range(2)).start()
    land(landing, 0)
    time.sleep(0.1)  # several polls
    land(landing, 1)
    refs = h.join()
    assert_sequence(refs, [0, 1])
    ignored = h.kinds("ignored")
    assert sorted(ignored) == sorted(f"{n}: name does not match the frame pattern" for n in odd)


def test_frames_outside_the_scan_are_reported(landing, harness):
    h = harness(landing, frames=range(2)).start()
    land(landing, 7)
    land(landing, 0)
    land(landing, 1)
    refs = h.join()
    assert_sequence(refs, [0, 1])
    assert h.kinds("ignored") == [f"{name(7)}: frame 7 is outside the scan"]


# -- landing directory ---------------------------------------------------------------------------------


def test_landing_directory_disappears_and_comes_back(tmp_path, harness):
    landing = tmp_path / "landing"
    landing.mkdir()
    h = harness(landing, frames=range(4), missing_timeout=5.0).start()
    land(landing, 0)
    land(landing, 1)
    h.wait_for(2)
    shutil.rmtree(landing)
    h.wait_event("landing", "unavailable")
    time.sleep(0.1)
    landing.mkdir()
    land(landing, 2)
    land(landing, 3)
    refs = h.join()
    assert_sequence(refs, [0, 1, 2, 3])
    assert all(r.error is None for r in refs)
    landing_events = h.kinds("landing")
    assert len(landing_events) == 2  # reported once each, not at every poll
    assert "unavailable" in landing_events[0] and "back" in landing_events[1]


def test_landing_directory_not_there_yet(tmp_path, harness):
    landing = tmp_path / "later"
    h = harness(landing, frames=range(2)).start()
    h.wait_event("landing", "unavailable")
    landing.mkdir()
    land(landing, 0)
    land(landing, 1)
    assert_sequence(h.join(), [0, 1])


# -- resume, offline, glob ------------------------------------------------------------------------------


def test_skip_frames_resume(landing, harness):
    for frame in range(6):
        land(landing, frame)
    h = harness(landing, frames=range(6), skip_frames={0, 1, 2}).start()
    refs = h.join()
    assert_sequence(refs, [3, 4, 5])
    for ref in refs:
        assert_good(ref, landing)
    assert not h.kinds("duplicate")  # files of reduced frames are expected, not news


def test_skip_frames_in_the_middle_without_scan(landing, harness):
    for frame in range(5):
        land(landing, frame)
    h = harness(landing, live=False, skip_frames={1, 3}).start()
    refs = h.join()
    assert_sequence(refs, [0, 2, 4])
    assert not any(r.missing for r in refs)


def test_offline_listing_finishes_with_gaps_missing(landing, harness):
    for frame in (0, 1, 3, 4):
        land(landing, frame)
    h = harness(landing, live=False, missing_timeout=30.0).start()
    refs = h.join(timeout=3.0)
    assert_sequence(refs, [0, 1, 2, 3, 4])
    assert [r.frame for r in refs if r.missing] == [2]


def test_offline_scan_declares_trailing_frames_missing(landing, harness):
    """With a scan offline, the directory is all there is: frames after the last file are missing too."""
    for frame in (0, 1, 2):
        land(landing, frame)
    h = harness(landing, frames=range(5), live=False, missing_timeout=30.0).start()
    refs = h.join(timeout=3.0)
    assert_sequence(refs, [0, 1, 2, 3, 4])
    assert [r.missing for r in refs] == [False, False, False, True, True]


def test_offline_partial_files_are_failed_not_waited_for(landing, harness):
    data = cbf_bytes(4)
    land(landing, 0)
    (landing / name(1)).write_bytes(truncated(data))
    h = harness(landing, live=False, missing_timeout=30.0).start()
    refs = h.join(timeout=3.0)
    assert_sequence(refs, [0, 1])
    assert refs[0].error is None
    # offline, the source does not re-read headers (the reader validates every file it loads):
    # the partial file is handed on at once, and reading it fails clearly
    assert not refs[1].missing and refs[1].path is not None
    from pipeline.cbf import IncompleteCbfError, read_frame

    with pytest.raises(IncompleteCbfError, match="binary section has"):
        read_frame(refs[1].path)


def test_offline_empty_directory_hands_on_nothing(landing, harness):
    h = harness(landing, live=False).start()
    assert h.join(timeout=2.0) == []


def test_glob_source(tmp_path, harness):
    landing = tmp_path / "landing"
    landing.mkdir()
    for frame in range(3):
        land(landing, frame, prefix="scanA_")
        land(landing, frame, prefix="scanB_")
    h = harness(str(landing / "scanA_*.cbf"), live=False).start()
    refs = h.join()
    assert_sequence(refs, [0, 1, 2])
    assert all(r.path.name.startswith("scanA_") for r in refs)
    assert not h.kinds("duplicate")


def test_glob_source_live_over_two_directories(tmp_path, harness):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    h = harness(str(tmp_path / "*" / "frame_*.cbf"), frames=range(4)).start()
    land(tmp_path / "a", 0)
    land(tmp_path / "b", 1)
    land(tmp_path / "a", 3)
    land(tmp_path / "b", 2)
    refs = h.join()
    assert_sequence(refs, [0, 1, 2, 3])
    assert [r.path.parent.name for r in refs] == ["a", "b", "b", "a"]


def test_first_frame_without_scan(landing, harness):
    for frame in range(5):
        land(landing, frame)
    h = harness(landing, live=False, first_frame=2).start()
    refs = h.join()
    assert_sequence(refs, [2, 3, 4])
    assert len(h.kinds("ignored")) == 2  # frames 0 and 1 are reported, not silently dropped


def test_late_frame_without_scan_is_reported_not_lost(landing, harness):
    """Without a scan the first frame is the lowest seen; one below it coming later cannot be ordered."""
    land(landing, 5)
    h = harness(landing).start()
    h.wait_for(1)
    land(landing, 3)
    land(landing, 6)
    h.wait_for(2)
    h.wait_event("ignored", name(3))
    refs = h.finish()
    assert_sequence(refs, [5, 6])


def test_frame_numbers_may_start_anywhere(landing, harness):
    for frame in (100, 101, 102):
        land(landing, frame)
    h = harness(landing, frames=range(100, 103)).start()
    assert_sequence(h.join(), [100, 101, 102])


def test_handed_on_frames_decode_to_their_data(landing, harness):
    """The path handed on is the file of that frame: decoding it gives the data written for it."""
    import fabio

    for frame in (2, 0, 1):
        land(landing, frame)
    h = harness(landing, frames=range(3), live=False).start()
    for ref in h.join():
        frame = read_frame(ref.path)
        assert frame.shape == SHAPE
        expected = np.random.default_rng(ref.frame).integers(-2, 5000, size=SHAPE).astype(np.int32)
        np.testing.assert_array_equal(fabio.open(str(ref.path)).data, expected)


# -- property: any arrival order, any gaps --------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_order_any_gaps_offline(data):
    n = data.draw(st.integers(2, 12), label="n")
    present = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="present")
    present[0] = True  # without a scan the first frame is the lowest present
    order = data.draw(st.permutations([f for f in range(n) if present[f]]), label="order")
    with_scan = data.draw(st.booleans(), label="with_scan")
    with tempfile.TemporaryDirectory() as tmp:
        landing = Path(tmp)
        for frame in order:
            land(landing, frame)
        h = Harness(landing, live=False, frames=range(n) if with_scan else None, missing_timeout=30.0).start()
        refs = h.join()
    last = n - 1 if with_scan else max(f for f in range(n) if present[f])
    assert_sequence(refs, list(range(last + 1)))
    assert [r.missing for r in refs] == [not present[f] for f in range(last + 1)]
    assert all((r.error is None) == present[r.frame] for r in refs)


def test_live_source_keeps_running_after_handed_on_files_settle(tmp_path):
    """Files stay in the landing directory long after they were handed on (the usual case without a data
    mover): once their re-write watch ends they are skipped quietly; nothing fails, nothing is reported twice."""
    from _support import write_cbf

    landing = tmp_path / "landing"
    landing.mkdir()
    blob = write_cbf(tmp_path / "template.cbf", np.arange(12, dtype=np.int32).reshape(3, 4)).read_bytes()
    for i in range(5):
        (landing / f"frame_{i:05d}.cbf").write_bytes(blob)
    events, refs = [], []
    source = LandingSource(landing, frames=range(10), live=True, poll_interval=0.01, missing_timeout=0.2,
                           on_event=lambda kind, text: events.append((kind, text)))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(refs.append, stop), daemon=True)
    thread.start()
    time.sleep(1.6)  # past the re-write watch (1 s) of the first five
    assert source._settled >= set(range(5)), "hand-out records were not dropped"
    for i in range(5, 10):
        (landing / f"frame_{i:05d}.cbf").write_bytes(blob)
    thread.join(timeout=10)
    stop.set()
    assert not thread.is_alive(), "the source did not finish the scan"
    assert [r.frame for r in refs] == list(range(10))
    assert all(r.error is None and not r.missing for r in refs)
    assert not [e for e in events if e[0] in ("duplicate", "error")], events
