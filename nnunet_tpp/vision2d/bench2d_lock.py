"""One lock file per ``bench2d`` run folder, so that shards and processes sharing a suite folder (one machine or
many, on a shared file system) never run the same run.

A lock is the file ``<run folder>/.bench2d.lock``, created with ``O_CREAT | O_EXCL`` (atomic: of two processes
creating it at once exactly one succeeds) and holding ``{"host", "pid", "started"}`` as JSON. The process that
holds it touches it every ``heartbeat`` seconds while the run goes on and removes it when the run ends
(finished or failed).

Stale locks (a holder that died without removing its lock, e.g. ``kill -9`` or a batch job past its time limit)
are taken over:

* on the same host, at once, when no process with the recorded pid is alive;
* from any host, when the lock was not touched for ``stale_after`` seconds (default 600, twenty missed
  heartbeats). The clocks of the machines sharing the folder must agree to well within that.

Taking over is serialised by a second file, ``.bench2d.lock.break`` (also ``O_EXCL``): its holder reads the
lock again, removes it only if it is still the same stale lock, and creates its own; a ``.break`` file older
than 60 s (its holder died in those few milliseconds) is removed. A lock you know to be dead can always be
deleted by hand.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".bench2d.lock"
STALE_AFTER = 600.0
HEARTBEAT = 30.0
BREAK_STALE = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _create(path: Path, content: dict) -> bool:
    """Creates ``path`` exclusively with ``content`` (JSON); False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(content))
    return True


class RunLock:
    """The lock of one folder (see the module docstring).

    Args:
        folder: the run folder (created when missing).
        stale_after: seconds without a heartbeat after which a lock of any host is stale.
    """

    def __init__(self, folder: str | os.PathLike, stale_after: float = STALE_AFTER):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.stale_after = float(stale_after)
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def holder(self) -> dict | None:
        """The current lock's content (``host``, ``pid``, ``started``, plus ``age`` in seconds since its last
        heartbeat), or None when there is no lock."""
        try:
            content = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            content, age = {}, 0.0  # being written right now: treat as held and fresh
        return {**content, "age": age} if isinstance(content, dict) else {"age": age}

    def is_stale(self, holder: dict) -> bool:
        """True for a lock whose holder is gone (module docstring)."""
        if holder.get("age", 0.0) > self.stale_after:
            return True
        same_host = holder.get("host") == self.me["host"]
        return same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])

    def acquire(self) -> bool:
        """Takes the lock; breaks a stale one. Returns False when another live process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        content = {**self.me, "started": time.time()}
        if _create(self.path, content):
            self.held = True
            return True
        holder = self.holder()
        if holder is None:  # removed in between: try once more
            self.held = _create(self.path, content)
            return self.held
        if not self.is_stale(holder) or not self._break(holder):
            return False
        self.held = _create(self.path, content)
        return self.held

    def _break(self, seen: dict) -> bool:
        """Removes the stale lock ``seen`` under the break file; False when someone else is breaking it."""
        breaker = self.path.with_name(LOCK_NAME + ".break")
        try:
            if time.time() - breaker.stat().st_mtime > BREAK_STALE:
                breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if not _create(breaker, self.me):
            return False
        try:
            now = self.holder()
            same = now is not None and {k: now.get(k) for k in ("host", "pid", "started")} == \
                {k: seen.get(k) for k in ("host", "pid", "started")}
            if now is None:
                return True
            if not same or not self.is_stale(now):
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            breaker.unlink(missing_ok=True)

    def touch(self) -> None:
        """The heartbeat: refreshes the lock's modification time (when held)."""
        if self.held:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        """Removes the lock if this process holds it (a lock taken over by another process is left alone)."""
        if not self.held:
            return
        self.held = False
        holder = self.holder()
        if holder is not None and holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)

    def describe(self) -> str:
        """``"host:pid, 12 s since its last heartbeat"`` for the current holder, or ``"nobody"``."""
        holder = self.holder()
        if holder is None:
            return "nobody"
        return f"{holder.get('host', '?')}:{holder.get('pid', '?')}, {holder['age']:.0f} s since its last heartbeat"


class Heartbeat:
    """A daemon thread that touches every lock in ``locks`` (a set this process adds to and removes from)
    every ``interval`` seconds; use as a context manager."""

    def __init__(self, interval: float = HEARTBEAT):
        self.interval = float(interval)
        self.locks: set[RunLock] = set()
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bench2d-heartbeat", daemon=True)

    def add(self, lock: RunLock) -> None:
        """Starts beating for ``lock``."""
        with self._guard:
            self.locks.add(lock)

    def discard(self, lock: RunLock) -> None:
        """Stops beating for ``lock``."""
        with self._guard:
            self.locks.discard(lock)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._guard:
                current = list(self.locks)
            for lock in current:
                lock.touch()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
