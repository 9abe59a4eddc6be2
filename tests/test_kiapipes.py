"""kiapipes.py: the pool lends only full-sized pipes, within its share of the user's pipe quota."""

from __future__ import annotations

import fcntl
import os
import sys

import pytest

import kiapipes

HAVE_SPLICE_HERE = sys.platform.startswith("linux") and hasattr(os, "splice")


@pytest.mark.parametrize(
    ("capable", "soft", "hard", "workers", "expected"),
    [
        (False, 16384, 0, 1, 48),  # 3/4 of the default quota, in 256-page pipes
        (False, 16384, 0, 4, 12),  # shared by the workers
        (False, 16384, 8192, 1, 24),  # the smaller of the two quotas
        (False, 0, 0, 4, 256),  # no quota: MAX_PIPES
        (False, 16384, 0, 64, 0),  # too many workers for the quota: copy only
        (True, 16384, 0, 1, 256),  # CAP_SYS_RESOURCE: the quota does not apply
    ],
)
def test_pipe_limit_shares_the_users_pipe_quota(monkeypatch, capable, soft, hard, workers, expected):
    quotas = {"/proc/sys/fs/pipe-user-pages-soft": soft, "/proc/sys/fs/pipe-user-pages-hard": hard}
    monkeypatch.setattr(kiapipes, "_LINUX", True)
    monkeypatch.setattr(kiapipes, "MAX_PIPES", 256)
    monkeypatch.setattr(kiapipes, "_capable", lambda bit: capable)
    monkeypatch.setattr(kiapipes, "_read_int", quotas.get)
    monkeypatch.setattr(kiapipes.os, "sysconf", lambda name: 4096)
    assert kiapipes.pipe_limit(workers) == expected


@pytest.mark.skipif(not HAVE_SPLICE_HERE, reason="pipes are sized only on Linux")
def test_pipe_pool_lends_only_full_pipes_and_counts_them(monkeypatch):
    pool = kiapipes.PipePool(limit=2, keep=1)
    first, second = pool.get(), pool.get()
    assert fcntl.fcntl(first[1], 1032) >= kiapipes.PIPE_SIZE  # F_GETPIPE_SZ
    assert pool.get() is None and pool.open == 2  # the cap: copy instead
    pool.put(first)
    pool.put(second)  # beyond what is kept: closed
    assert (pool.open, pool.free) == (1, [first])
    assert pool.get() == first
    monkeypatch.setattr(kiapipes, "_F_SETPIPE_SZ", 1032)  # F_GETPIPE_SZ: "sizing" leaves the default 64 KiB
    assert pool.get() is None and pool.limit == 1  # a pipe that could not be sized is never lent
    pool.put(first, empty=False)
    assert pool.open == 0
