"""Reading JSONL data files (demonstrations, preference pairs) with errors that name the file and line.

One JSON object per line; blank lines are skipped. Every problem a user can fix in the file (a line that is
not JSON, a line that is not an object, a missing or mistyped field) is a :class:`DataError` naming the
file and the 1-based line number, so a bad row in a file of thousands is found at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the file and, where it applies, the line."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a JSONL file as ``(line_number, object)`` pairs (1-based; blank lines skipped).

    Raises:
        DataError: the file is missing or holds no rows, or a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    return rows


def require_fields(path: str | Path, number: int, row: dict[str, Any], fields: Iterable[str], kind: type = str) -> None:
    """Check that ``row`` has each of ``fields`` with a value of type ``kind``.

    >>> require_fields("d.jsonl", 3, {"prompt": "a", "completion": 1}, ["prompt", "completion"])
    Traceback (most recent call last):
    ...
    textrl.jsonl.DataError: d.jsonl, line 3: field 'completion' must be a str, got int
    """
    for name in fields:
        if name not in row:
            raise DataError(f"{path}, line {number}: missing field {name!r} (the row has {sorted(row)})")
        if not isinstance(row[name], kind):
            raise DataError(
                f"{path}, line {number}: field {name!r} must be a {kind.__name__}, got {type(row[name]).__name__}"
            )
