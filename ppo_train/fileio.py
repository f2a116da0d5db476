"""Files: the one way pptrain writes atomically, the one rule for "is this a local path", and
the bundled assets.

Atomic writes: everything is written under a temporary sibling name (`<name>.tmp`, or the
name the caller gives) and renamed into place only when complete, so a crash or a full disk
leaves either the old version or the new one, never a half-written file or folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ppo_train.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS = PACKAGE_DIR / "assets"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def publish(tmp: Path, final: Path) -> None:
    """Move a complete `tmp` (file or folder) to `final`, replacing what is there. An existing
    folder is first renamed aside, so `final` is never missing while a copy of it exists."""
    aside = final.with_name(final.name + ".old")
    _remove(aside)
    if final.is_dir():
        final.rename(aside)
    os.replace(tmp, final)
    _remove(aside)


@contextmanager
def staged(final: Path, tmp: Path | None = None) -> Iterator[Path]:
    """`with staged(path) as tmp:` write the file or folder `tmp`; on a normal exit it replaces
    `path`, on an exception it is removed and the exception propagates (`path` untouched)."""
    tmp = tmp or final.with_name(final.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path) as tmp:
        tmp.write_text(text)
    return path


def is_local_path(value: str) -> bool:
    """The one rule: a value names a local file or folder (not a hub id) when it starts with
    `/`, `.` or `~`, has a data-file suffix, or exists on disk."""
    value = str(value)
    return (value.startswith(("/", ".", "~")) or Path(value).suffix in DATA_SUFFIXES
            or Path(value).expanduser().exists())


def asset_path(relative: str) -> Path:
    """A file or folder bundled in `ppo_train/assets` (`${asset:...}` in configs)."""
    path = (ASSETS / relative).resolve()
    if not path.is_relative_to(ASSETS):
        raise ConfigError([f"${{asset:{relative}}}: leaves the package's assets folder {ASSETS}"])
    return path
