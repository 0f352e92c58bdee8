"""Process plumbing every server shares: pid files, exit waits, stopping, log tails, readiness polls.

Each way of serving (:mod:`splitpack.serving.backend`) runs detached processes that a later
command (``splitpack serve NAME stop|status``) finds again through a pid file; these helpers are
the one way to read such a file, to wait for a process to exit, to stop it and to wait for it
to become ready.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is as good as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def read_pid(pid_file: Path, command: str | None = None) -> int | None:
    """The pid in ``pid_file`` if that process is alive and, with ``command``, its command line has
    it as one argument, or a path ending in it (a stale pid file may name a recycled pid: only trust it if it is
    still our process); else None."""
    try:
        pid = int(Path(pid_file).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if command is not None and not any(arg == command or arg.endswith(f"/{command}")
                                       for arg in cmdline.decode(errors="replace").split("\0")):
        return None
    return pid if alive(pid) else None


def wait_exit(pid: int, timeout: float, child: subprocess.Popen | None = None) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit (``child``: our own Popen of it, which reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (child.poll() is not None) if child is not None else not alive(pid):
            return True
        time.sleep(0.2)
    return False


def kill_group(pid: int) -> None:
    """SIGKILL the process group (session) led by ``pid``: what it left behind."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def terminate(pid: int, timeout: float, child: subprocess.Popen | None = None) -> None:
    """SIGTERM ``pid`` (a session leader we started: it drains and stops what it runs), SIGKILL its
    session if it hangs past ``timeout``, then whatever of its session is still left."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout, child):
        kill_group(pid)
        wait_exit(pid, 10, child)
    kill_group(pid)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def poll(check: Callable[[], T | None], timeout: float, timed_out: Callable[[], Exception],
         interval: float = 0.5) -> T:
    """Call ``check`` until it returns something (not None) and return that; it raises to fail at once.
    After ``timeout`` s raise ``timed_out()``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise timed_out()
        time.sleep(interval)


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (TIME_WAIT leftovers are no conflict)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
