"""Where a frame sits in the sinogram: frame number -> (rotation, translation)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

ORDERS = ("row", "snake", "column")


class ScanError(ValueError):
    """A scan description that cannot be used."""


@dataclass
class ScanModel:
    """An XRD-CT scan of ``rotations`` x ``translations`` frames.

    ``order`` says how the frames were taken: ``row`` (translation fastest,
    each line in the same direction), ``snake`` (translation fastest, every
    other line reversed) or ``column`` (rotation fastest).  ``positions`` maps
    frame numbers to (rotation, translation) explicitly, e.g. from position
    capture, and overrides the order.
    """

    rotations: int
    translations: int
    order: str = "row"
    first_frame: int = 0
    positions: dict[int, tuple[int, int]] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.rotations < 1 or self.translations < 1:
            raise ScanError(f"scan shape must be positive, got {self.rotations}x{self.translations}")
        if self.rotations * self.translations > 100_000_000:
            raise ScanError("scan larger than 1e8 frames")
        if self.order not in ORDERS:
            raise ScanError(f"scan order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.positions is not None:
            self._check_positions()

    def _check_positions(self) -> None:
        """Every position inside the scan, no two frames in one cell (a negative index would wrap)."""
        if not self.positions:
            raise ScanError("positions given but empty")
        cells: dict[tuple[int, int], int] = {}
        for frame, (rot, trans) in sorted(self.positions.items()):
            if not (0 <= rot < self.rotations and 0 <= trans < self.translations):
                raise ScanError(f"frame {frame} at ({rot}, {trans}) lies outside the scan "
                                f"{self.rotations}x{self.translations}")
            if (rot, trans) in cells:
                raise ScanError(f"frames {cells[(rot, trans)]} and {frame} both sit at ({rot}, {trans})")
            cells[(rot, trans)] = frame

    @classmethod
    def parse(cls, text: str, **kwargs) -> ScanModel:
        """From ``NROTxNTRANS`` (e.g. ``180x100``)."""
        try:
            rot, trans = (int(v) for v in text.lower().split("x"))
        except ValueError as exc:
            raise ScanError(f"scan shape must read NROTxNTRANS, got {text!r}") from exc
        return cls(rot, trans, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, first_frame: int | None = None) -> ScanModel:
        """From a CSV with columns ``frame,rotation,translation`` (indices).

        ``first_frame`` defaults to the lowest frame number listed.
        """
        positions: dict[int, tuple[int, int]] = {}
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames:
                reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            for row in reader:
                try:
                    frame, rot, trans = int(row["frame"]), int(row["rotation"]), int(row["translation"])
                except (KeyError, ValueError, TypeError) as exc:  # TypeError: a short row gives None
                    raise ScanError(f"{path}: needs integer columns frame,rotation,translation") from exc
                if frame in positions:
                    raise ScanError(f"{path}: frame {frame} listed twice")
                positions[frame] = (rot, trans)
        if not positions:
            raise ScanError(f"{path}: no positions")
        nrot = max(p[0] for p in positions.values()) + 1
        ntrans = max(p[1] for p in positions.values()) + 1
        if min(min(p) for p in positions.values()) < 0:
            raise ScanError(f"{path}: negative index")
        return cls(nrot, ntrans, first_frame=min(positions) if first_frame is None else first_frame,
                   positions=positions)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rotations, self.translations)

    @property
    def n_frames(self) -> int:
        return len(self.positions) if self.positions is not None else self.rotations * self.translations

    def frames(self) -> range | list[int]:
        if self.positions is not None:
            return sorted(self.positions)
        return range(self.first_frame, self.first_frame + self.n_frames)

    @property
    def last_frame(self) -> int:
        return max(self.frames())

    def position(self, frame: int) -> tuple[int, int]:
        """(rotation index, translation index) of a frame; KeyError outside the scan."""
        if self.positions is not None:
            return self.positions[frame]
        index = frame - self.first_frame
        if not 0 <= index < self.n_frames:
            raise KeyError(f"frame {frame} outside the scan {self.rotations}x{self.translations}")
        if self.order == "column":
            return index % self.rotations, index // self.rotations
        rot, trans = divmod(index, self.translations)
        if self.order == "snake" and rot % 2 == 1:
            trans = self.translations - 1 - trans
        return rot, trans
