"""Scan model: frame number -> (rotation index, translation index)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.scan import ORDERS, ScanError, ScanModel


def reference_positions(rotations: int, translations: int, order: str, first: int = 0) -> dict:
    """The acquisition written out as the motors move, frame by frame."""
    out = {}
    frame = first
    if order == "column":  # rotation fastest
        for trans in range(translations):
            for rot in range(rotations):
                out[frame] = (rot, trans)
                frame += 1
        return out
    for rot in range(rotations):
        line = range(translations)
        if order == "snake" and rot % 2 == 1:
            line = reversed(line)
        for trans in line:
            out[frame] = (rot, trans)
            frame += 1
    return out


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 7)])
def test_orders_match_the_motor_sequence(order, shape):
    scan = ScanModel(*shape, order=order)
    expected = reference_positions(*shape, order)
    assert {f: scan.position(f) for f in scan.frames()} == expected
    assert scan.n_frames == shape[0] * shape[1]
    assert scan.shape == shape


def test_row_order_translation_fastest():
    scan = ScanModel(3, 4)
    assert scan.order == "row"
    assert [scan.position(f) for f in range(5)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]


def test_snake_reverses_every_other_line():
    scan = ScanModel(3, 4, order="snake")
    assert [scan.position(f) for f in range(4, 9)] == [(1, 3), (1, 2), (1, 1), (1, 0), (2, 0)]


def test_column_order_rotation_fastest():
    scan = ScanModel(3, 4, order="column")
    assert [scan.position(f) for f in range(4)] == [(0, 0), (1, 0), (2, 0), (0, 1)]


@settings(max_examples=60, deadline=None)
@given(rotations=st.integers(1, 12), translations=st.integers(1, 12), order=st.sampled_from(ORDERS),
       first=st.integers(-5, 1000))
def test_every_order_is_a_bijection_onto_the_grid(rotations, translations, order, first):
    scan = ScanModel(rotations, translations, order=order, first_frame=first)
    frames = list(scan.frames())
    assert frames == list(range(first, first + rotations * translations))
    assert scan.last_frame == frames[-1]
    cells = [scan.position(f) for f in frames]
    assert sorted(cells) == [(r, t) for r in range(rotations) for t in range(translations)]
    assert {f: c for f, c in zip(frames, cells)} == reference_positions(rotations, translations, order, first)
    if order == "snake":  # consecutive frames are neighbours: the motor never jumps back
        for a, b in zip(cells, cells[1:]):
            assert abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1
    for outside in (first - 1, first + rotations * translations):
        with pytest.raises(KeyError):
            scan.position(outside)


def test_first_frame_shifts_numbers():
    scan = ScanModel(2, 3, first_frame=100)
    assert list(scan.frames()) == list(range(100, 106))
    assert scan.position(100) == (0, 0)
    assert scan.position(105) == (1, 2)
    assert scan.last_frame == 105
    with pytest.raises(KeyError):
        scan.position(0)


@pytest.mark.parametrize("text,shape", [("180x100", (180, 100)), ("2X3", (2, 3)), (" 4 x 5 ", (4, 5)),
                                        ("1x1", (1, 1))])
def test_parse(text, shape):
    scan = ScanModel.parse(text, order="snake", first_frame=7)
    assert scan.shape == shape
    assert scan.order == "snake" and scan.first_frame == 7


@pytest.mark.parametrize("text", ["180", "axb", "2x3x4", "2.5x3", "", "x", "0x5", "5x0", "-1x3"])
def test_parse_errors(text):
    with pytest.raises(ScanError):
        ScanModel.parse(text)


@pytest.mark.parametrize("kwargs", [dict(rotations=0, translations=3), dict(rotations=3, translations=-1),
                                    dict(rotations=20000, translations=20000),
                                    dict(rotations=2, translations=2, order="spiral")])
def test_invalid_models(kwargs):
    with pytest.raises(ScanError):
        ScanModel(**kwargs)


def test_scan_error_is_a_value_error():
    """The CLI turns ValueError into a clean message and exit code 2."""
    assert issubclass(ScanError, ValueError)


# -- positions from a file -------------------------------------------------------------------------------


def write_csv(tmp_path, text: str):
    path = tmp_path / "positions.csv"
    path.write_text(text)
    return path


def test_positions_from_file(tmp_path):
    rows = {10: (0, 1), 11: (0, 0), 12: (1, 0), 13: (1, 1), 15: (2, 1)}  # 14 not measured
    lines = ["frame,rotation,translation"] + [f"{f},{r},{t}" for f, (r, t) in sorted(rows.items(), reverse=True)]
    scan = ScanModel.from_file(write_csv(tmp_path, "\n".join(lines) + "\n"))
    assert scan.shape == (3, 2)
    assert scan.n_frames == len(rows)
    assert list(scan.frames()) == sorted(rows)
    assert scan.last_frame == max(rows)
    assert scan.first_frame == min(rows)
    for frame, cell in rows.items():
        assert scan.position(frame) == cell
    with pytest.raises(KeyError):
        scan.position(14)


def test_positions_override_the_order(tmp_path):
    path = write_csv(tmp_path, "frame,rotation,translation\n0,1,1\n1,0,0\n2,1,0\n3,0,1\n")
    scan = ScanModel.from_file(path)
    assert [scan.position(f) for f in range(4)] == [(1, 1), (0, 0), (1, 0), (0, 1)]


def test_positions_file_header_spaces_and_column_order(tmp_path):
    path = write_csv(tmp_path, "translation, Rotation ,frame\n2, 0, 5\n0, 1, 6\n")
    scan = ScanModel.from_file(path)
    assert scan.position(5) == (0, 2) and scan.position(6) == (1, 0)
    assert scan.shape == (2, 3)


def test_explicit_first_frame_is_kept(tmp_path):
    path = write_csv(tmp_path, "frame,rotation,translation\n5,0,0\n6,0,1\n")
    assert ScanModel.from_file(path, first_frame=0).first_frame == 0
    assert ScanModel.from_file(path).first_frame == 5


@pytest.mark.parametrize("text,match", [
    ("frame,rotation\n0,0\n", "columns"),
    ("frame,rotation,translation\n0,a,0\n", "columns"),
    ("frame,rotation,translation\n0,0\n", "columns"),  # short row
    ("frame,rotation,translation\n0,0,0\n0,0,1\n", "twice"),
    ("frame,rotation,translation\n0,-1,0\n1,0,0\n", "negative|outside"),
    ("frame,rotation,translation\n", "no positions"),
    ("", "no positions"),
    ("frame,rotation,translation\n0,0,0\n1,0,0\n", "both sit"),  # two frames in one cell
])
def test_positions_file_errors(tmp_path, text, match):
    with pytest.raises(ScanError, match=match):
        ScanModel.from_file(write_csv(tmp_path, text))


def test_positions_file_missing(tmp_path):
    with pytest.raises(OSError):
        ScanModel.from_file(tmp_path / "nope.csv")


@pytest.mark.parametrize("positions", [{0: (0, 0), 1: (2, 0)}, {0: (0, 0), 1: (0, -1)},
                                       {0: (0, 0), 1: (0, 0)}, {}])
def test_explicit_positions_are_checked(positions):
    """A negative or too large index would silently land in the wrong sinogram cell."""
    with pytest.raises(ScanError):
        ScanModel(2, 2, positions=positions)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.randoms(use_true_random=False), st.integers(0, 50))
def test_positions_file_round_trip(tmp_path_factory, rotations, translations, rnd, first):
    cells = [(r, t) for r in range(rotations) for t in range(translations)]
    rnd.shuffle(cells)
    keep = cells[: rnd.randint(1, len(cells))]
    positions = {first + i: cell for i, cell in enumerate(keep)}
    lines = ["frame,rotation,translation"] + [f"{f},{r},{t}" for f, (r, t) in positions.items()]
    path = tmp_path_factory.mktemp("pos") / "p.csv"
    path.write_text("\n".join(lines))
    scan = ScanModel.from_file(path)
    assert scan.n_frames == len(positions)
    assert scan.shape == (max(r for r, _ in keep) + 1, max(t for _, t in keep) + 1)
    assert {f: scan.position(f) for f in scan.frames()} == positions
