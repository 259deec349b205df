"""Keep file names that come from clients inside the directories they may use.

A name written by a client (a mask path, an output file name) is resolved the way the kernel will
resolve it when the file is opened: ``..`` components and every symbolic link on the way are
followed (``os.path.realpath``), then the result must lie strictly inside one of the allowed
directories, themselves resolved the same way.  So ``../x``, an absolute path elsewhere, a link
(anywhere on the path) pointing outside and an HDF5 ``file.h5::/dataset`` whose file part does any
of this are refused with one message that names the allowed directories.

What this cannot stop: someone who may write into an allowed directory swapping a checked path for a
link between the check and the open (the device re-checks at Start, the readers do not re-check).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError

MAX_NAME = 4096  # characters of a client-given path (PATH_MAX)
H5_SEPARATOR = "::"


class PathError(ConfigError):
    """A client-given path that leaves its allowed directories (or is not a usable name)."""


def _roots(bases: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    out = []
    for base in bases:
        text = os.fspath(base).strip()
        if text:
            out.append((text, Path(os.path.realpath(text))))
    return out


def describe(bases: Sequence[str | os.PathLike]) -> str:
    """The allowed directories as a client reads them in an error message."""
    names = [text for text, _ in _roots(bases)]
    return ", ".join(names) if names else "(none configured)"


def is_under(path: str | os.PathLike, bases: Sequence[str | os.PathLike]) -> bool:
    """True when ``path`` (symbolic links resolved) lies strictly inside one of ``bases`` (resolved too)."""
    resolved = Path(os.path.realpath(path))
    return any(resolved != root and resolved.is_relative_to(root) for _, root in _roots(bases))


def resolve_under(bases: Sequence[str | os.PathLike], name: str, what: str, *, must_exist: bool = False) -> Path:
    """The real path of ``name`` if it lies inside one of ``bases``; :class:`PathError` if it does not,
    :class:`ConfigError` if it is no usable name (empty, NUL, too long) or, with ``must_exist``, no file.

    A relative ``name`` is taken relative to the first base.  ``what`` names the setting in the
    message ("mask file", "output file").  ``must_exist``: the result must be an existing regular
    file (after links).  The base directories themselves need not exist yet.
    """
    roots = _roots(bases)
    if not roots:
        raise PathError(f"{what} {name!r} refused: no directory is configured for it")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what}: empty name")
    if "\x00" in name:
        raise ConfigError(f"{what} {name!r}: NUL character in the name")
    if len(name) > MAX_NAME:
        raise ConfigError(f"{what}: name longer than {MAX_NAME} characters")
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = Path(roots[0][0]) / candidate
    resolved = Path(os.path.realpath(candidate))
    if not any(resolved != root and resolved.is_relative_to(root) for _, root in roots):
        lexical = Path(os.path.normpath(os.path.abspath(candidate)))
        through_link = any(lexical != Path(os.path.normpath(os.path.abspath(text))) and
                           lexical.is_relative_to(os.path.normpath(os.path.abspath(text))) for text, _ in roots)
        how = "through a symbolic link " if through_link else ""
        raise PathError(f"{what} {name!r} leads {how}outside the allowed directories ({describe(bases)}); "
                        "only files inside them are accepted")
    if must_exist and not resolved.is_file():
        raise ConfigError(f"{what} {name!r} does not exist (or is not a regular file) in {describe(bases)}")
    return resolved


def split_h5(spec: str) -> tuple[str, str | None]:
    """``file.h5::/path`` -> (``file.h5``, ``/path``); anything else -> (spec, None)."""
    if H5_SEPARATOR in spec:
        file_part, inner = spec.split(H5_SEPARATOR, 1)
        return file_part, inner
    return spec, None


def resolve_mask(bases: Sequence[str | os.PathLike], spec: str) -> str:
    """A mask given as ``file`` or ``file.h5::/dataset``, its file part confined to ``bases``.

    Returns the same form with the file part replaced by its real path.  The dataset path is only
    checked for shape here (no NUL, absolute-or-relative HDF5 path); it cannot leave the file, and
    :func:`pipeline.geometry.load_mask` refuses external links, external storage and virtual datasets.
    """
    file_part, inner = split_h5(spec)
    if inner is not None and (not inner.strip() or "\x00" in inner or len(inner) > MAX_NAME):
        raise ConfigError(f"mask {spec!r}: bad HDF5 dataset path after '::'")
    path = resolve_under(bases, file_part, "mask file", must_exist=True)
    return str(path) if inner is None else f"{path}{H5_SEPARATOR}{inner}"
