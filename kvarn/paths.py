"""Why a path given by the user cannot be opened, in words (for one-line errors)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def path_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` can be stat'ed, else what is wrong with it: a symbolic link loop, a
    dangling link, a file where a folder should be, no permission, or nothing there."""
    p = Path(path)
    try:
        os.stat(p)
        return None
    except OSError as e:
        code = e.errno
    if code == errno.ELOOP:
        return "is a symbolic link loop (the link points back at itself)"
    if p.is_symlink():
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return f"is a dangling symbolic link (to {target}, which does not exist)"
    if code == errno.ENOTDIR:
        return "has a file where a folder should be in its path"
    if code == errno.EACCES:
        return "cannot be reached (permission denied on a folder in its path)"
    if code == errno.ENAMETOOLONG:
        return "is too long a name for this file system"
    return "does not exist"


def kind_of(path: str | os.PathLike) -> str:
    """``"file"``, ``"folder"`` or a description of another kind of file (device, pipe, socket)."""
    p = Path(path)
    if p.is_file():
        return "file"
    if p.is_dir():
        return "folder"
    if p.is_char_device() or p.is_block_device():
        return "a device"
    if p.is_fifo():
        return "a named pipe"
    if p.is_socket():
        return "a socket"
    return "not a regular file"


SHIPPED_DIRS = ("calibrate", "recipes")


def shipped_dir(name: str) -> Path:
    """The folder of data kvarn ships: ``calibrate`` (calibration specs) or ``recipes``.

    In a source checkout (and an editable install) these are the repository's top-level folders,
    next to the ``kvarn`` package. A wheel carries them inside the package as ``kvarn/_data/<name>``
    (``setup.py`` maps them there at build time), so an installed kvarn finds them without the
    repository.
    """
    if name not in SHIPPED_DIRS:
        raise ValueError(f"unknown shipped folder {name!r}; valid names are {list(SHIPPED_DIRS)}")
    package = Path(__file__).resolve().parent
    inside = package / "_data" / name
    return inside if inside.is_dir() else package.parent / name
