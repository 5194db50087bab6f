"""Where kvarn may write: one check for every output path, run before any work starts.

kvarn replaces a file only when it wrote it (a recipe, a PNG), or when the user says ``--overwrite``;
never a device or other non-regular file, never a model's weight file, even with ``--overwrite``.
The nearest existing folder must be a folder we can create files in (tested by creating one), so a
read-only folder, a parent that is a file or ``/proc`` fail in one line before a model loads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import KvarnError
from .paths import kind_of, path_problem

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".pkl", ".h5", ".msgpack")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == PNG_SIGNATURE
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, flag: str, what: str, is_ours: Callable[[Path], bool],
                 overwrite: bool = False) -> Path:
    """The path to write, or a one-line ``KvarnError`` naming ``flag``; writes nothing."""
    p = Path(path).expanduser()
    if p.is_symlink() or p.exists():
        if not p.is_file():
            problem = path_problem(p)
            if problem is not None:  # a link that leads nowhere (dangling, or a loop)
                raise KvarnError(f"{flag} {p}: {problem}; kvarn does not write through it — give a file path")
            kind = "a folder" if p.is_dir() else f"{kind_of(p)}, not a regular file"
            raise KvarnError(f"{flag} {p}: exists and is {kind}; kvarn writes only regular files — give a file path")
        if not is_ours(p):
            if p.suffix.lower() in WEIGHT_SUFFIXES:
                raise KvarnError(f"{flag} {p}: exists and looks like model weights, not a {what}; kvarn never "
                                 "replaces it (not even with --overwrite) — write the recipe elsewhere")
            if not overwrite:
                raise KvarnError(f"{flag} {p}: exists and is not a {what} kvarn wrote; pass --overwrite to replace "
                                 "it, or give another path")
    folder = p.parent
    while not folder.exists():
        if folder.is_symlink():  # a dangling link as a folder
            raise KvarnError(f"{flag} {p}: {folder} is a dangling link; give a path in an existing folder")
        folder = folder.parent
    if not folder.is_dir():
        raise KvarnError(f"{flag} {p}: {folder} is a file, not a folder; give a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvarn-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise KvarnError(f"{flag} {p}: cannot create files in {folder} ({e.strerror or type(e).__name__}); "
                         "give a path in a writable folder") from None
    return p
