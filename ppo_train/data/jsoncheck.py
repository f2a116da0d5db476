"""Local JSON and JSON Lines files, checked before `datasets` reads them.

`datasets` stops at a byte that is not UTF-8, a line that is not JSON or a lone surrogate
escape (`"\\ud800"`, which no tokenizer can encode) with a traceback that names neither the
file's line nor the row. This scan finds them first, one line at a time:

- `dataset.on_invalid=error`: a DataError naming the file, the line, the row and what is wrong.
- `skip` (JSON Lines only): `datasets` reads a copy in which each bad line is replaced by a
  marker row; `normalize_row` turns the marker into the same DataError, so the row keeps its
  number, is skipped and counted like any other invalid row. A `.json` file holding one
  document (an array of rows) has no rows to skip until it parses, so it is always an error;
  a `.json` file in JSON Lines form (which `datasets` also reads) is scanned line by line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ppo_train import fileio
from ppo_train.errors import DataError

INVALID = "__pptrain_invalid__"  # the marker column of a replaced line


def line_problem(raw: bytes) -> str | None:
    """What is wrong with one JSON Lines line (None if it is a JSON object of encodable text)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"undecodable text: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg} at column {err.colno})"
    if not isinstance(value, dict):
        return f"expected a JSON object per line, got {type(value).__name__}"
    if "\\ud" in text.lower():  # surrogate escapes: fine in pairs, unencodable alone
        return _surrogate_problem(value)
    return None


def _surrogate_problem(value) -> str | None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                return (f"undecodable text: a lone surrogate \\u{ord(item[err.start]):04x} "
                        f"(an escape of half a UTF-16 pair) in {item[max(0, err.start - 20):err.start]!r}...")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def checked_path(path: Path, on_invalid: str, cache_dir: Path | None = None) -> Path:
    """The file `datasets` should read: `path` itself if every line is fine, else (skip) a copy
    with the bad lines replaced by marker rows; raises DataError under on_invalid=error."""
    if path.suffix == ".json" and _checked_document(path):
        return path
    bad: dict[int, str] = {}
    row = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines are not rows
            problem = line_problem(raw.rstrip(b"\r\n"))
            if problem:
                message = f"{path} row {row} (line {number}): {problem}"
                if on_invalid != "skip":
                    raise DataError(f"{message} (dataset.on_invalid=skip skips such rows and counts them)")
                bad[number] = message
            row += 1
    if not bad:
        return path
    return _copy_with_markers(path, bad, cache_dir or _cache_dir())


def _checked_document(path: Path) -> bool:
    """True if `path` is one JSON document with no undecodable text; False if it is not one
    document (JSON Lines under a .json name: the line scan names its problems). An array that
    is broken (`[` first: it cannot be read as lines) raises DataError with the line."""
    data = path.read_bytes()
    array = data.lstrip().startswith(b"[")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        if not array:
            return False
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: undecodable text: byte 0x{data[err.start]:02x} is not UTF-8 "
                        "(a .json file must parse as a whole; as .jsonl, dataset.on_invalid=skip could skip "
                        "the row)") from None
    except json.JSONDecodeError as err:
        if not array:
            return False
        raise DataError(f"{path} line {err.lineno} column {err.colno}: not JSON ({err.msg})") from None
    for index, item in enumerate(value if isinstance(value, list) else [value]):
        problem = _surrogate_problem(item)
        if problem:
            raise DataError(f"{path} row {index}: {problem}")
    return True


def _copy_with_markers(path: Path, bad: dict[int, str], cache_dir: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir / f"{path.stem}-{key}.jsonl"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with fileio.staged(out) as tmp, path.open("rb") as src, tmp.open("wb") as dst:
        for number, raw in enumerate(src, start=1):
            if number in bad:
                raw = (json.dumps({INVALID: bad[number]}) + "\n").encode()
            dst.write(raw)
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pptrain" / "checked"
