"""Make this Python look like OpenBSD's: delete the Linux-only calls at start-up.

``site`` imports ``sitecustomize`` from ``sys.path`` once the path is set up, and
``PYTHONPATH`` entries come before the standard library there, so with this
directory on ``PYTHONPATH`` it runs first in every process: the test process and
each gateway subprocess (which inherit the environment). ``.ci/run`` runs the whole
suite so, to exercise the portable paths on Linux. It shadows a distribution's own
``sitecustomize`` (Debian's only sets up apport), which is acceptable for a test run.
"""

import fcntl
import os
import signal
import socket

# What OpenBSD's (or macOS's) Python lacks and the gateway or its tests could reach for.
LINUX_ONLY = {
    os: ("splice", "SPLICE_F_MOVE", "SPLICE_F_NONBLOCK", "SPLICE_F_MORE", "sched_getaffinity"),
    signal: ("sigtimedwait", "sigwaitinfo"),
    socket: ("SOCK_NONBLOCK",),
    fcntl: ("F_SETPIPE_SZ", "F_GETPIPE_SZ"),
}

for module, names in LINUX_ONLY.items():
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
        if name in getattr(module, "__all__", ()):  # gevent copies a module's names through __all__
            module.__all__.remove(name)
