"""What every report carries and how it is written: provenance, and strict JSON.

``--json`` output is strict JSON (RFC 8259): a number that is not finite (a standard error over one
window is NaN) is written as ``null``, so ``json.loads`` in any language, ``jq`` and
``json.dumps(..., allow_nan=False)`` accept it. Every report holds a ``provenance`` object: the
versions of kvarn, torch, transformers and Python, the UTC date, the command line and the seed,
plus what the command resolved (device, dtype, model source).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import shlex
import sys
from importlib import metadata
from pathlib import PurePath


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(seed: int | None = None, command: list[str] | str | None = None, **extra) -> dict:
    """Versions, date, command line (``sys.argv`` unless given) and seed, plus ``extra`` fields."""
    from . import __version__

    if command is None:
        command = sys.argv
    return {
        "kvarn": __version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if isinstance(command, str) else shlex.join(str(a) for a in command),
        "seed": seed,
        **extra,
    }


def strict(obj):
    """``obj`` with every non-finite float replaced by ``None`` and every value JSON can hold:
    dataclasses and mappings become objects (keys as strings), tuples and sets lists, paths,
    dtypes and devices their text."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [strict(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # a 0-d tensor or numpy scalar
        return strict(obj.item())
    if isinstance(obj, PurePath):
        return str(obj)
    return str(obj)


def dumps(obj, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see ``strict``); never NaN or Infinity."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False, ensure_ascii=False)
