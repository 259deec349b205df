"""One typed, validated configuration for a reduction.

Everything a client can set (CLI flags, Tango attributes) lands here and is
checked here, so the rules live in one place: ranges, enumerations, and a
strict PONI parser that never evaluates client text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

UNITS = ("q_nm^-1", "q_A^-1", "2th_deg")
SPLITS = ("no", "bbox", "full")
ENGINES = ("auto", "cpu", "opencl")
ERROR_MODELS = ("poisson", "none")
MAX_BINS = 100_000
MAX_SCAN_SIDE = 16_384  # rotations or translations: the largest sinogram image a Tango client can read
MAX_SCAN_FRAMES = 10_000_000  # frames of one scan: bounds the memory of the frame bookkeeping

_PONI_FLOAT_KEYS = ("distance", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength",
                    "pixelsize1", "pixelsize2")
_PONI_TEXT_KEYS = ("detector", "detector_config", "poni_version", "orientation", "splinefile",
                   "parallax")
_PONI_REQUIRED = ("distance", "poni1", "poni2", "rot1", "rot2", "rot3")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says why."""


def parse_poni(text: str) -> dict[str, str]:
    """Parse PONI text strictly into a dict pyFAI accepts.

    Lines are ``key: value``; ``#`` starts a comment.  Like pyFAI, a key given
    twice keeps its last value (files with several concatenated calibrations
    exist).  Unknown keys, non-finite numbers and missing keys are errors.
    """
    if len(text) > 64 * 1024:
        raise ConfigError("PONI text longer than 64 KiB")
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if ":" not in stripped:
            raise ConfigError(f"PONI line {lineno} is not 'key: value': {stripped[:60]!r}")
        key, value = (part.strip() for part in stripped.split(":", 1))
        key = key.lower()
        if key in _PONI_FLOAT_KEYS:
            try:
                number = float(value)
            except ValueError as exc:
                raise ConfigError(f"PONI {key} is not a number: {value!r}") from exc
            if not math.isfinite(number):
                raise ConfigError(f"PONI {key} is not finite")
        elif key in _PONI_TEXT_KEYS:
            _check_poni_text(key, value)
        else:
            raise ConfigError(f"unknown PONI key {key!r} on line {lineno}")
        values[key] = value
    missing = [k for k in _PONI_REQUIRED if k not in values]
    if missing:
        raise ConfigError(f"PONI lacks {', '.join(missing)}")
    if "detector" not in values and not ("pixelsize1" in values and "pixelsize2" in values):
        raise ConfigError("PONI names neither a detector nor pixel sizes")
    if float(values["distance"]) <= 0:
        raise ConfigError("PONI distance must be positive")
    for key in ("pixelsize1", "pixelsize2"):
        if key in values and float(values[key]) <= 0:
            raise ConfigError(f"PONI {key} must be positive")
    if "wavelength" not in values or float(values["wavelength"]) <= 0:
        raise ConfigError("PONI needs a positive wavelength to integrate in q or 2theta")
    return values


def _no_file(key: str, value) -> None:
    """PONI text comes from clients: a setting that names a file on the server is refused."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return
    raise ConfigError(f"PONI {key} names a file ({str(value)[:60]!r}); file references are not accepted in "
                      "geometry text (the server would read them): use a named detector without spline or "
                      "offset files")


def _check_poni_text(key: str, value: str) -> None:
    """The text-valued PONI keys, strictly: known detector names only, no file references, integer enums."""
    if key == "detector":
        known_detector(value)
    elif key == "detector_config":
        try:
            config = json.loads(value)
        except ValueError as exc:
            raise ConfigError("PONI detector_config is not valid JSON") from exc
        if not isinstance(config, dict):
            raise ConfigError("PONI detector_config must be a JSON object")
        for name, item in config.items():
            if "file" in str(name).lower():
                _no_file(f"detector_config {name}", item)
            elif str(name).lower() == "orientation":
                _check_orientation(item)
    elif key == "splinefile":
        _no_file(key, value)
    elif key == "orientation":
        _check_orientation(value)
    elif key == "poni_version":
        try:
            version = float(value)
        except ValueError as exc:
            raise ConfigError(f"PONI poni_version is not a number: {value!r}") from exc
        if not 1 <= version <= 10:
            raise ConfigError(f"PONI poni_version {value!r} is not a PONI version")
    elif key == "parallax":
        if value.strip().lower() not in ("true", "false", "none", ""):
            raise ConfigError(f"PONI parallax must be true or false, got {value[:20]!r}")


def _check_orientation(value) -> None:
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise ConfigError(f"PONI orientation must be an integer 0..8, got {str(value)[:20]!r}") from exc
    if not 0 <= number <= 8:
        raise ConfigError(f"PONI orientation must be an integer 0..8, got {number}")


def known_detector(name: str) -> None:
    """A pyFAI detector name or class name; never a path (pyFAI would open a file of that name)."""
    text = name.strip()
    if not text or "/" in text or "\\" in text or text.startswith(".") or len(text) > 100:
        raise ConfigError(f"PONI detector {name[:60]!r} is not a detector name (paths to detector files "
                          "are not accepted)")
    if os.path.lexists(text):  # pyFAI.detector_factory would open it as a NeXus detector file
        raise ConfigError(f"PONI detector {text!r} is also a file name in the server's working directory: refused")
    import pyFAI.detectors

    registry = pyFAI.detectors.Detector.registry
    candidates = (text.lower(), text.lower().replace(" ", "_"))
    if any(c in registry for c in candidates):
        return
    cls = getattr(pyFAI.detectors, text, None)
    if isinstance(cls, type) and issubclass(cls, pyFAI.detectors.Detector) and cls.__name__ != "NexusDetector":
        return
    raise ConfigError(f"PONI detector {text[:60]!r} is not a detector pyFAI knows")


@dataclass
class ReductionConfig:
    """Settings of one reduction.  ``validate()`` raises :class:`ConfigError`."""

    poni_text: str = ""
    mask_path: str | None = None
    bins: int = 1000
    unit: str = "q_nm^-1"
    split: str = "no"
    polarization: float | None = None
    solid_angle: bool = True
    dummy: float | None = None  # None: the detector's own (Pilatus: -2 +- 1.5 covers -1 and -2)
    delta_dummy: float | None = None
    error_model: str = "poisson"
    radial_range: tuple[float, float] | None = None
    engine: str = "auto"
    opencl_device: str | None = None
    workers: int = 0  # 0: one per core
    check_md5: bool = False
    batch_size: int = 32
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_files(cls, poni: str | Path, **kwargs) -> ReductionConfig:
        return cls(poni_text=Path(poni).read_text(), **kwargs)

    def validate(self) -> ReductionConfig:
        if not self.poni_text:
            raise ConfigError("no geometry: give a PONI file")
        parse_poni(self.poni_text)
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 1 <= self.bins <= MAX_BINS:
            raise ConfigError(f"bins must be an integer in 1..{MAX_BINS}, got {self.bins!r}")
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.error_model not in ERROR_MODELS:
            raise ConfigError(f"error model must be one of {', '.join(ERROR_MODELS)}")
        if self.polarization is not None and not -1.0 <= float(self.polarization) <= 1.0:
            raise ConfigError(f"polarization factor must lie in [-1, 1], got {self.polarization}")
        if self.radial_range is not None:
            lo, hi = self.radial_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"radial range must be two finite increasing numbers, got {self.radial_range}")
        if self.mask_path is not None and not Path(str(self.mask_path).split("::", 1)[0]).is_file():  # file.h5::/path
            raise ConfigError(f"mask file {self.mask_path} does not exist")
        if not 0 <= int(self.workers) <= 256:
            raise ConfigError("workers must lie in 0..256")
        if not 1 <= int(self.batch_size) <= 1024:
            raise ConfigError("batch size must lie in 1..1024")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


_SCAN_SHAPE = re.compile(r"\s*([0-9]{1,9})\s*[xX]\s*([0-9]{1,9})\s*")


def parse_scan_shape(text: str) -> tuple[int, int]:
    """``NROTxNTRANS`` from a client, strictly: ASCII digits, each side 1..16384, at most 1e7 frames."""
    match = _SCAN_SHAPE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"scan shape must read NROTxNTRANS (e.g. 180x100), got {str(text)[:40]!r}")
    rot, trans = int(match.group(1)), int(match.group(2))
    if not (1 <= rot <= MAX_SCAN_SIDE and 1 <= trans <= MAX_SCAN_SIDE):
        raise ConfigError(f"scan shape {rot}x{trans}: each side must lie in 1..{MAX_SCAN_SIDE}")
    if rot * trans > MAX_SCAN_FRAMES:
        raise ConfigError(f"scan shape {rot}x{trans}: more than {MAX_SCAN_FRAMES:,} frames")
    return rot, trans


SPLIT_ALIASES = {"none": "no", "pixel": "full"}


def normalise_unit(unit: str) -> str:
    """Accept the common spellings of a unit (``q_A-1``, ``2theta``...)."""
    compact = re.sub(r"[\s_^]", "", unit).lower()
    table = {"qnm-1": "q_nm^-1", "q": "q_nm^-1", "qa-1": "q_A^-1", "2thdeg": "2th_deg", "2theta": "2th_deg",
             "2th": "2th_deg", "tth": "2th_deg"}
    if unit in UNITS:
        return unit
    if compact in table:
        return table[compact]
    raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
