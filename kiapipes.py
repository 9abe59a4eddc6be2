"""The pipes a splicing relay borrows: a pool of empty pipes of one size, bounded by the user's pipe quota.

Its own module because it is the one part of the relay that holds state across
connections and reads the host (the per-user pipe quota, the process's
capabilities): relay.py borrows a pipe while data is in flight and gives it
back; the life cycle shares the quota among workers (``configure_pipes``).
"""

from __future__ import annotations

import fcntl
import os
import sys

PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ for pooled pipes: 1 MiB moves bulk data in few syscalls
PIPES_KEPT = 64  # free pipes kept for reuse; creating and sizing a pipe costs more than a small connection
# Pipes a process may have open, lent and kept (HAProxy's maxpipes); beyond it directions
# copy. Each pins up to PIPE_SIZE of kernel memory behind a stalled reader: 256 MiB at most.
# KIAGATEWAY_MAX_PIPES overrides it (0 turns splicing off; tests use a small one).
MAX_PIPES = 256
PIPE_QUOTA_SHARE = 0.75  # of the user's pipe quota, for all workers' pools; the rest for its other pipes

_LINUX = sys.platform.startswith("linux")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; named in fcntl only from Python 3.10
_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE = 21, 24  # capability bits: either lifts the per-user pipe quota

if os.environ.get("KIAGATEWAY_MAX_PIPES"):
    try:
        MAX_PIPES = int(os.environ["KIAGATEWAY_MAX_PIPES"])
    except ValueError:
        raise ValueError(f"KIAGATEWAY_MAX_PIPES={os.environ['KIAGATEWAY_MAX_PIPES']!r} is not a whole number") from None


class PipePool:
    """Empty pipes of PIPE_SIZE lent to directions while they splice; at most ``limit`` open."""

    def __init__(self, limit: int | None = None, keep: int = PIPES_KEPT) -> None:
        self.limit = limit  # pipes open at most, lent and kept; None: pipe_limit(1) when first needed
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.open = 0

    def get(self) -> tuple[int, int] | None:
        """A pipe, or None: then the direction copies. Never one smaller than PIPE_SIZE, which
        would make splicing slower than copying."""
        if self.free:
            return self.free.pop()
        if self.limit is None:
            self.limit = pipe_limit(1)
        if self.open >= self.limit:
            return None
        try:
            pipe = _pipe()
        except OSError:  # out of descriptors
            return None
        try:
            size = fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # EPERM: over the user's pipe quota or fs.pipe-max-size
            size = 0
        if size < PIPE_SIZE:
            os.close(pipe[0])
            os.close(pipe[1])
            self.limit = self.open  # the quota is spent: stop paying four syscalls per try
            return None
        self.open += 1
        return pipe

    def put(self, pipe: tuple[int, int], empty: bool = True) -> None:
        if empty and len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])
            self.open -= 1


def _pipe() -> tuple[int, int]:
    if hasattr(os, "pipe2"):
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    read_end, write_end = os.pipe()  # not inheritable already
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    return read_end, write_end


def pipe_limit(workers: int) -> int:
    """How many pipes one of ``workers`` processes may open: MAX_PIPES, within its share of the user's quota.

    Without CAP_SYS_RESOURCE, Linux refuses to grow a pipe (F_SETPIPE_SZ fails
    with EPERM) once all the pipes of the user, in every process, hold
    fs.pipe-user-pages-soft pages (16384 by default: 64 pipes of 1 MiB), and
    new pipes get 8 KiB. Root in a container usually lacks the capability too.
    """
    limit = MAX_PIPES
    if not _LINUX or _capable(_CAP_SYS_RESOURCE) or _capable(_CAP_SYS_ADMIN):
        return limit
    quotas = [_read_int(f"/proc/sys/fs/pipe-user-pages-{kind}") for kind in ("soft", "hard")]
    quotas = [q for q in quotas if q]  # 0 or unreadable: no such limit
    if quotas:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            page = 4096
        pages_per_pipe = max(1, PIPE_SIZE // page)
        limit = min(limit, int(min(quotas) * PIPE_QUOTA_SHARE) // max(1, workers) // pages_per_pipe)
    return limit


def configure_pipes(workers: int) -> int:
    """Share the user's pipe quota among ``workers`` processes; call in each, after dropping privileges."""
    PIPES.limit = pipe_limit(workers)
    return PIPES.limit


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _capable(bit: int) -> bool:
    """Whether this process holds a capability, from /proc/self/status (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


PIPES = PipePool()
