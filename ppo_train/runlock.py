"""One run per run directory: a lock file that names its holder.

`<run>/run.lock` is created with O_CREAT | O_EXCL (atomic on local file systems and on NFS v3+)
and holds the host, the PID and the start time of the process that owns the directory. A
second process finds it and stops with a one-line error naming the holder. A lock left by a
process that died (same host, PID no longer alive, or alive but started after the lock was
written, i.e. a reused PID) is stale: it is taken over by renaming it aside, which only one
contender can do. A lock from another host cannot be checked from here: the message says how
to remove it. Only rank 0 takes the lock; the other ranks of a launch share the directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ppo_train.errors import PptrainError

LOCK_NAME = "run.lock"


class RunDirectoryBusy(PptrainError, RuntimeError):
    """Another live process holds the run directory."""


def _start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid: int, written_at: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    started = _start_time(pid)
    return started is None or started <= written_at + 1.0  # a PID reused after the lock is another process


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirectoryBusy(f"{self.path.parent}: could not take the run directory's lock {self.path}")

    def _take_over_if_stale(self) -> None:
        try:
            text = self.path.read_text()
            holder = json.loads(text or "{}")
        except (OSError, ValueError):
            text, holder = None, {}  # being written right now, or torn: treat as held unless old
        if not isinstance(holder, dict):  # valid JSON that is not pptrain's lock object: torn as well
            holder = {}
        host, pid, when = holder.get("host"), holder.get("pid"), float(holder.get("time", 0) or 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
        if not holder:
            try:
                if time.time() - self.path.stat().st_mtime < 10:
                    time.sleep(0.5)
                    return
            except FileNotFoundError:
                return
        elif host != socket.gethostname():
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by PID {pid} on host {host} (since {since}); one run per "
                f"directory. If that process is gone, delete {self.path}")
        elif isinstance(pid, int) and _alive(pid, when):
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by PID {pid} on this host ({host}, since {since}); one run per "
                "directory: wait for it, stop it, or give this run another directory (hydra.run.dir=...)")
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)  # only one contender wins this rename
        except FileNotFoundError:
            return  # another process took it over first; try again
        try:
            if aside.read_text() != text:  # a fresh lock replaced the stale one meanwhile
                os.link(aside, self.path)  # put it back unless yet another lock exists
        except OSError:
            pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
