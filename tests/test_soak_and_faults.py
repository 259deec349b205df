"""Short versions of `xrdct soak` and `xrdct faults` (the 10-minute soak and 3-run fault table are in the README)."""

from __future__ import annotations

import pytest

from pipeline.faults import markdown, run_faults
from pipeline.soak import run_soak

pytestmark = [pytest.mark.timeout(300), pytest.mark.leaves_threads]


def test_short_soak_every_frame_once_in_order_with_the_right_pattern(tmp_path):
    report = run_soak(seconds=12, rate=250, detector="pilatus300k", engine="cpu", workdir=tmp_path,
                      bins=500, log=lambda *a: None)
    assert report.state == "done"
    assert report.frames_sent == 3000
    assert report.frames_reduced == report.frames_sent
    assert report.frames_lost == report.frames_duplicated == 0
    assert report.out_of_order == report.pattern_mismatches == 0
    assert report.frames_missing == report.frames_failed == 0
    assert report.backlog_max < 250, "the reduction fell a second behind the detector"
    assert report.samples and report.rss_max_mb > 0


def test_fault_table_counts_from_the_output_file():
    rows = run_faults(runs=1, only=["baseline", "zero-byte", "never arrive", "duplicated"], log=lambda *a: None)
    by_name = {r.fault: r for r in rows}
    assert len(rows) == 4
    assert all(r.passed for r in rows), markdown(rows)
    assert by_name["none (baseline)"].reduced == 24 and by_name["none (baseline)"].flagged == 0
    assert by_name["zero-byte file"].flagged == 2 and by_name["zero-byte file"].reduced == 22
    assert by_name["frames that never arrive"].flagged == 3
    assert by_name["duplicated frame numbers, odd names"].duplicated == 0
    assert "| zero-byte file | 1 | 24 | 22 | 2 | 0 | 0 | pass |" in markdown(rows)
