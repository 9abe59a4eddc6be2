"""Listening sockets that outlive a program: socket activation, and the upgrade in place that reuses it.

Its own module because both are one mechanism, systemd's ``LISTEN_FDS``
protocol (sd_listen_fds(3)): systemd, or ``systemd-socket-activate``, hands the
gateway its listeners that way, and on SIGUSR2 the gateway hands them on the
same way to the program it execs in its own process, so that the PID systemd
and rc.d track stays and the sockets never close: the kernel queues the
clients who come meanwhile. It neither binds nor serves (kiaprocess.py does,
and calls this module) and imports nothing from kiagateway.py. It uses only
what every Unix Python has: OpenBSD is a target.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import Callable, NoReturn, Protocol

import kiareload
from kiaconfig import Config, ConfigError

LISTEN_FDS_START = 3  # sd_listen_fds(3): the first descriptor handed over; the others follow it
LISTENER_NAMES = ("http", "https")  # the names a handed-over socket may carry: which listener it is
UPGRADED_FROM = "KIAGATEWAY_UPGRADED_FROM"  # set by the program that upgrades for the one it runs: its version
SYSTEMD_SOCKETS = "KIAGATEWAY_SYSTEMD_SOCKETS"  # set by an upgrade whose sockets came from systemd: they still do
DRAINING = "KIAGATEWAY_DRAINING"  # set likewise: the PIDs of its processes still draining, comma-separated
GENERATION = "KIAGATEWAY_GENERATION"  # set likewise: how many upgrades in place this PID has been through
# Seconds the new program gets to check itself (--check) before an upgrade: it takes 1-2 s on a busy machine
# (interpreter, imports, a big table); one that has not ended by then would not start either.
CHECK_TIMEOUT = 30.0
# The signals the new program handles: held (blocked) across exec, delivered once its handlers are in place,
# so that a SIGTERM sent while it starts is a graceful stop and not the default death.
HELD_SIGNALS = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class ActivationError(Exception):
    """The handed-over descriptors cannot be the listeners; the message names the descriptor."""


def inherited_listeners() -> list[tuple[str, socket.socket]] | None:
    """The listening sockets handed to this process, with their names; None when none were.

    The variables are removed whatever they hold, as sd_listen_fds(1) does,
    so that no child takes them for its own; descriptors meant for another
    process (``LISTEN_PID`` not ours) are left alone.
    """
    os.environ.pop(SYSTEMD_SOCKETS, None)  # read before, by sockets_from_systemd()
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or pid.strip() != str(os.getpid()):
        return None
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS must be a number of descriptors, got {count!r}")
    given = names.split(":") if names else []
    listeners = []
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        name = given[index] if index < len(given) else ""
        if name not in LISTENER_NAMES:
            said = f"is named {name!r}" if name else "has no name"
            raise ActivationError(
                f"inherited socket fd {fd} {said}: name each one http or https"
                " (FileDescriptorName= in its .socket unit, --fdname= of systemd-socket-activate)"
            )
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"inherited fd {fd} ({name}) is not a socket: {exc.strerror}") from None
        accepting = socket.SO_ACCEPTCONN if hasattr(socket, "SO_ACCEPTCONN") else None  # elsewhere accept() tells
        if (
            sock.family not in (socket.AF_INET, socket.AF_INET6)
            or sock.type != socket.SOCK_STREAM
            or (accepting is not None and not sock.getsockopt(socket.SOL_SOCKET, accepting))
        ):
            sock.detach()  # not ours to close
            raise ActivationError(f"inherited socket fd {fd} ({name}) is not a listening TCP socket")
        sock.setblocking(False)
        sock.set_inheritable(False)  # workers are forked, not executed: only an upgrade hands it on, on purpose
        listeners.append((name, sock))
    return listeners


def sockets_from_systemd() -> bool:
    """True if systemd hands this process its listeners, itself or through the upgrades in place since.

    Then the listen lists of the config are ignored, now and at every restart
    (systemd keeps the sockets): a config may leave both empty. To be asked
    before ``inherited_listeners``, which removes the variables.
    """
    if os.environ.get("LISTEN_PID", "").strip() != str(os.getpid()) or "LISTEN_FDS" not in os.environ:
        return False
    return UPGRADED_FROM not in os.environ or os.environ.get(SYSTEMD_SOCKETS) == "1"


def upgraded_from() -> str | None:
    """The version of the program that upgraded into this one, if one did; the variable goes with it."""
    return os.environ.pop(UPGRADED_FROM, None)


def previous_generation() -> set[int]:
    """The PIDs of the old program's processes still draining when it upgraded into this one; the variable goes."""
    return {int(word) for word in os.environ.pop(DRAINING, "").split(",") if word.isdigit()}


def generation() -> int:
    """How many upgrades in place this process has been through: 0 for a program started afresh.

    Left in the environment (unlike the variables above), for the workers to read.
    """
    text = os.environ.get(GENERATION, "")
    return int(text) if text.isdigit() else 0


def command() -> list[str]:
    """The command line this process started with: interpreter options, the script (or -m), the arguments.

    Run again, it loads the program from disk afresh: after ``pip install -U``
    the script and the modules there are the new ones. It is run by
    ``sys.executable`` but keeps its first word, so that ps and pgrep (rc.d's
    check) see the same line as before.
    """
    return list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])  # orig_argv: Python 3.10+


def check_command() -> list[str]:
    """The command the upgrade would run with ``--check`` first among the arguments: the new program checking itself.

    First, so that it comes before any ``--`` and never after CONFIG, and the
    usage line takes it with whatever options the program was started with.
    """
    argv = command()
    arguments = sys.argv[1:]
    return [sys.executable, *argv[1 : len(argv) - len(arguments)], "--check", *arguments]


def new_program_fails(systemd: bool = False) -> str | None:
    """Run the new program with ``--check``: why it cannot start (the last line it printed), or None if it can.

    ``systemd``: the listeners come from systemd, so the check, which has no
    sockets of its own, lets the config's listen lists be empty as start-up does.

    What loads the old code's modules cannot see an ImportError after a
    partial ``pip install -U`` nor a key only the old code accepts; the new
    program itself can. Blocks: see Upgrade.starts.
    """
    try:
        done = subprocess.run(
            check_command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=CHECK_TIMEOUT,
            env={**os.environ, SYSTEMD_SOCKETS: "1"} if systemd else None,
        )
    except subprocess.TimeoutExpired:
        return f"the new program's --check did not end within {CHECK_TIMEOUT:g} s"
    except OSError as exc:
        return f"cannot run the new program: {exc.strerror}"
    if done.returncode == 0:
        return None
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"its --check ended with exit status {done.returncode} and no word"


def cannot_run() -> str | None:
    """Why the program would fail to start, if it can be seen before trying; None if it looks runnable."""
    if not os.access(sys.executable, os.X_OK):
        return f"{sys.executable} is not an executable Python any more"
    script = sys.argv[0]  # the script, the .pyz, or the module's file with -m
    if script not in ("", "-c") and not os.path.exists(script):
        return f"{script} is gone"
    return None


def cannot_become(user: str) -> str | None:
    """Why the new program could not run as ``user``: it starts as this process runs, after any privilege drop."""
    if not user or os.getuid() == 0:
        return None
    import pwd

    uid = pwd.getpwnam(user).pw_uid  # load() checked that the user exists
    if uid != os.getuid():
        return f"user changed to {user}: only a restart, which starts as root, can switch to it"
    return None


class _Log(Protocol):
    def info(self, message: str, **fields: object) -> None: ...

    def error(self, message: str, **fields: object) -> None: ...

    def close(self) -> None: ...


class Upgrade:
    """An upgrade in place, made by the main process: validate, then exec the program on the same sockets.

    The caller first sees to the open connections: a forked child of a lone
    process keeps them, a supervisor's workers drain them; this process then
    becomes the new program, which inherits the listeners and the children.
    """

    def __init__(
        self,
        version: str,
        load: Callable[[], Config],
        log: _Log,
        listeners: list[tuple[str, socket.socket]],
        reloading: Callable[[], None],
        systemd: bool = False,
    ) -> None:
        self.version = version
        self.load = load
        self.log = log
        self.listeners = listeners
        self.reloading = reloading  # tells systemd that a reload has begun; the new program's READY=1 ends it
        self.systemd = systemd  # the listeners came from systemd: the listen lists are ignored (sockets_from_systemd)
        self.previous = previous_generation()  # the old program's processes still draining: a stop waits for them
        self.checked: Config | None = None  # the config ready() read, for starts()

    def ready(self) -> bool:
        """True if the new program can start: its config reads well and the program is there; else say why."""
        try:
            new = self.load()  # the same reading the new program will do, so a bad file stops us here
        except ConfigError as exc:
            for line in exc.errors:
                self.log.error(f"upgrade aborted, the running program goes on: {line}")
            return False
        problem = cannot_run() or cannot_become(new.settings.user)
        if problem:
            self.log.error(f"upgrade aborted, the running program goes on: {problem}")
            return False
        self.checked = new
        return True

    def starts(self, cooperative: bool = True) -> bool:
        """True if the new program, run with ``--check``, accepts the config; else log why, in its own words.

        Asked after ``ready()``.

        Run before anything is handed over or told to stop. The check runs in a
        child (kiareload.load_in_child): a process with an event loop
        (``cooperative``) keeps serving meanwhile, and the child collects the
        check's exit status itself, which this process's reaper of orphans
        would otherwise take. The supervisor, which has no loop, blocks.
        """

        def check() -> Config:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited reaper would take the check's status
            problem = new_program_fails(self.systemd)
            if problem:
                raise ConfigError([f"the new program cannot start: {problem}"])
            return self.checked  # read by ready() already; the loader child hands a Config back

        try:
            kiareload.load_in_child(check, cooperative)
        except ConfigError as exc:
            for line in exc.errors:
                self.log.error(f"upgrade aborted, the running program goes on: {line}")
            return False
        return True

    def hand_over(self, draining: Iterable[int] = ()) -> NoReturn:
        """Exec the program afresh in this process, the listeners at descriptors 3 and up. Never returns.

        A failure of exec itself leaves this process half-way (the descriptors
        moved, the connections handed off): it logs and exits 1, for the
        service manager to start the gateway again. ``draining``: the PIDs of
        the old program's processes, which the new one waits for when it stops.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        argv = command()
        self.reloading()
        self.log.info("upgrading: running the program afresh", version=self.version, pid=os.getpid())
        self.log.close()  # exec skips atexit: write what the reader has not taken yet
        env = dict(
            os.environ,
            LISTEN_FDS=str(len(self.listeners)),
            LISTEN_PID=str(os.getpid()),  # exec keeps the PID
            LISTEN_FDNAMES=":".join(name for name, _ in self.listeners),
            **{
                UPGRADED_FROM: self.version,
                DRAINING: ",".join(map(str, draining)),
                GENERATION: str(generation() + 1),
            },
            **({SYSTEMD_SOCKETS: "1"} if self.systemd else {}),
        )
        try:
            move_to_start([sock.fileno() for _, sock in self.listeners])
            os.execve(sys.executable, argv, env)
        except OSError as exc:
            self.log.error("upgrade failed: cannot run the program; exiting", command=" ".join(argv), cause=str(exc))
            self.log.close()
            os._exit(1)


def move_to_start(fds: list[int]) -> None:
    """Put ``fds`` at 3, 4... in order, inheritable. What was there is overwritten: for just before exec."""
    end = LISTEN_FDS_START + len(fds)
    dup = getattr(fcntl, "F_DUPFD_CLOEXEC", fcntl.F_DUPFD)
    # First above every target, so that no dup2 below overwrites a descriptor still to be moved.
    high = [fcntl.fcntl(fd, dup, end) for fd in fds]
    for index, fd in enumerate(high):
        os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
        os.close(fd)
