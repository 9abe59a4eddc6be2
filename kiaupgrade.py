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

import dataclasses
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterable
from typing import Callable, NoReturn, Protocol

import kiareload
from kiaconfig import Config, ConfigError, parse_address

LISTEN_FDS_START = 3  # sd_listen_fds(3): the first descriptor handed over; the others follow it
LISTENER_NAMES = ("http", "https", "quic")  # the names a handed-over socket may carry: which listener it is
QUIC = "quic"  # the one a UDP socket carries
METRICS = "metrics"  # the name of metrics_listen's socket, which only an upgrade in place hands over
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

    Besides ``http`` and ``https``, an upgrade in place hands over ``metrics``
    (metrics_listen's socket), so that the new program never binds it anew.

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
    known = (*LISTENER_NAMES, METRICS) if UPGRADED_FROM in os.environ else LISTENER_NAMES
    listeners = []
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        name = given[index] if index < len(given) else ""
        if name not in known:
            said = f"is named {name!r}" if name else "has no name"
            raise ActivationError(
                f"inherited socket fd {fd} {said}: name each one http, https or quic (UDP)"
                " (FileDescriptorName= in its .socket unit, --fdname= of systemd-socket-activate)"
            )
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"inherited fd {fd} ({name}) is not a socket: {exc.strerror}") from None
        accepting = socket.SO_ACCEPTCONN if hasattr(socket, "SO_ACCEPTCONN") else None  # elsewhere accept() tells
        if name == QUIC:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_DGRAM:
                sock.detach()
                raise ActivationError(f"inherited socket fd {fd} ({name}) is not a UDP socket")
        elif (
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
    """The command the upgrade runs: the new program checking itself, ``--check --json`` first among the arguments.

    First, so that they come before any ``--`` and never after CONFIG, and the
    usage line takes them with whatever options the program was started with.
    """
    argv = command()
    arguments = sys.argv[1:]
    return [sys.executable, *argv[1 : len(argv) - len(arguments)], "--check", "--json", *arguments]


def check_new_program(systemd: bool = False) -> dict:
    """Run the new program with ``--check --json``: its settings as it reads them (its JSON's ``gateway``).

    Raises ConfigError saying why it cannot start: its own errors, else the
    last line it printed (an ImportError's, say). ``systemd``: the listeners
    come from systemd, so the check, which has no sockets of its own, lets the
    config's listen lists be empty as start-up does.

    What loads the old code's modules cannot see an ImportError after a
    partial ``pip install -U`` nor a key only the old code accepts; the new
    program itself can. Blocks: see Upgrade.starts.
    """
    try:
        done = subprocess.run(
            check_command(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CHECK_TIMEOUT,
            env={**os.environ, SYSTEMD_SOCKETS: "1"} if systemd else None,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError([f"the new program's --check did not end within {CHECK_TIMEOUT:g} s"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot run the new program: {_os_error(exc, check_command()[0])}"]) from None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    if done.returncode == 0:  # a program that prints no settings: the old code's reading of the config stands
        return report["gateway"] if isinstance(report, dict) and isinstance(report.get("gateway"), dict) else {}
    if isinstance(report, dict) and report.get("errors"):
        raise ConfigError([str(error) for error in report["errors"]])
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    status = f"its --check ended with exit status {done.returncode}"
    raise ConfigError([lines[-1] if lines else f"{status} and no word"])


def cannot_run() -> str | None:
    """Why the program would fail to start, if it can be seen before trying; None if it looks runnable."""
    problem = not_runnable(sys.executable)
    if problem:
        return f"cannot run the interpreter {sys.executable}: {problem}"
    script = sys.argv[0]  # the script, the .pyz, or the module's file with -m
    if script not in ("", "-c") and not os.path.exists(script):
        return f"{script} is gone"
    return None


def not_runnable(path: str) -> str | None:
    """What stops this process from running ``path``, named: the directory or file and why; None if nothing.

    After a privilege drop an interpreter under a 0700 home (pyenv's, a
    virtualenv's) cannot be reached any more: the operator needs the
    directory that bars the way, not just the interpreter's name. A virtualenv's
    ``python`` is a symlink, so the directories of its target are looked at too.
    """
    if os.access(path, os.X_OK):
        return None
    for candidate in dict.fromkeys([os.path.abspath(path), os.path.realpath(path)]):
        parts = candidate.split("/")[1:-1]
        for depth in range(len(parts)):
            directory = "/" + "/".join(parts[: depth + 1])
            if not os.path.exists(directory) and not os.path.islink(directory):
                return f"no such directory {directory}"
            if not os.access(directory, os.X_OK):
                return f"permission denied on {directory} ({_owner_and_mode(directory)}, {_who()} cannot search it)"
    if not os.path.exists(path):
        return f"no such file {path}" + (" (a symlink whose target is gone)" if os.path.islink(path) else "")
    target = os.path.realpath(path)
    return f"permission denied on {target} ({_owner_and_mode(target)}, {_who()} cannot execute it)"


def _owner_and_mode(path: str) -> str:
    st = os.stat(path)
    try:
        import pwd

        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}"


def _who() -> str:
    """This process's user as it runs now, for messages: the name and uid."""
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except KeyError:
        return f"uid {os.geteuid()}"


def _os_error(exc: OSError, path: str) -> str:
    """An OSError as "permission denied on PATH": what failed and on which file."""
    return f"{(exc.strerror or str(exc)).lower()} on {exc.filename or path}"


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
        metrics: tuple[str, socket.socket] | None = None,
        bind: Callable[[str], socket.socket] | None = None,
    ) -> None:
        self.version = version
        self.load = load
        self.log = log
        self.listeners = listeners
        self.reloading = reloading  # tells systemd that a reload has begun; the new program's READY=1 ends it
        self.systemd = systemd  # the listeners came from systemd: the listen lists are ignored (sockets_from_systemd)
        self.previous = previous_generation()  # the old program's processes still draining: a stop waits for them
        self.checked: Config | None = None  # the config ready() read, for starts()
        self.metrics = metrics  # metrics_listen as running and its socket, handed over if the new program keeps it
        self.bind = bind  # binds a metrics_listen the new program wants and this one does not have; ConfigError
        self.handed_metrics: socket.socket | None = None  # what the new program gets as its metrics socket

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
        """True if the new program, run with ``--check``, accepts the config and its metrics socket is ready.

        Asked after ``ready()``; else it logs why, in the new program's own words.

        Run before anything is handed over or told to stop. The check runs in a
        child (kiareload.load_in_child): a process with an event loop
        (``cooperative``) keeps serving meanwhile, and the child collects the
        check's exit status itself, which this process's reaper of orphans
        would otherwise take. The supervisor, which has no loop, blocks.

        Then metrics_listen as the new program reads it: the running socket is
        handed over if the address is the same; another address is bound here,
        now, so that a port someone else holds aborts the upgrade while this
        program still serves (DESIGN.md: not one connection refused by it).
        """
        checked = self.checked

        def check() -> Config:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited reaper would take the check's status
            try:
                theirs = check_new_program(self.systemd)
            except ConfigError as exc:
                raise ConfigError([f"the new program cannot start: {line}" for line in exc.errors]) from None
            metrics_listen = theirs.get("metrics_listen", checked.settings.metrics_listen)
            if not isinstance(metrics_listen, str):
                raise ConfigError([f"the new program's --check --json gave metrics_listen {metrics_listen!r}"])
            # The loader child hands a Config back: the one ready() read, with the new program's metrics_listen.
            settings = dataclasses.replace(checked.settings, metrics_listen=metrics_listen)
            return dataclasses.replace(checked, settings=settings)

        try:
            new = kiareload.load_in_child(check, cooperative)
            self.handed_metrics = self._metrics_socket(new.settings.metrics_listen)
        except ConfigError as exc:
            for line in exc.errors:
                self.log.error(f"upgrade aborted, the running program goes on: {line}")
            return False
        return True

    def _metrics_socket(self, metrics_listen: str) -> socket.socket | None:
        """The socket for the new program's ``metrics_listen``: the running one if the address is the same, else
        one bound now (ConfigError names the address and the cause); None without metrics."""
        if not metrics_listen:
            return None
        if self.metrics is not None and _same_address(self.metrics[0], metrics_listen):
            return self.metrics[1]
        if self.bind is None:
            raise ConfigError([f"metrics_listen {metrics_listen}: this program cannot bind it for the new one"])
        sock = self.bind(metrics_listen)
        self.log.info("bound metrics_listen for the new program", address=metrics_listen)
        return sock

    def cancel(self) -> None:
        """The upgrade is not made after all: close a metrics socket bound for the new program."""
        if self.handed_metrics is not None and (self.metrics is None or self.handed_metrics is not self.metrics[1]):
            self.handed_metrics.close()
        self.handed_metrics = None

    def hand_over(self, draining: Iterable[int] = ()) -> NoReturn:
        """Exec the program afresh in this process, the listeners at descriptors 3 and up. Never returns.

        A failure of exec itself leaves this process half-way (the descriptors
        moved, the connections handed off): it logs and exits 1, for the
        service manager to start the gateway again. ``draining``: the PIDs of
        the old program's processes, which the new one waits for when it stops.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        argv = command()
        sockets = [*self.listeners, *([(METRICS, self.handed_metrics)] if self.handed_metrics is not None else [])]
        self.reloading()
        self.log.info("upgrading: running the program afresh", version=self.version, pid=os.getpid())
        self.log.close()  # exec skips atexit: write what the reader has not taken yet
        env = dict(
            os.environ,
            LISTEN_FDS=str(len(sockets)),
            LISTEN_PID=str(os.getpid()),  # exec keeps the PID
            LISTEN_FDNAMES=":".join(name for name, _ in sockets),
            **{
                UPGRADED_FROM: self.version,
                DRAINING: ",".join(map(str, draining)),
                GENERATION: str(generation() + 1),
            },
            **({SYSTEMD_SOCKETS: "1"} if self.systemd else {}),
        )
        try:
            move_to_start([sock.fileno() for _, sock in sockets])
            os.execve(sys.executable, argv, env)
        except OSError as exc:
            self.log.error("upgrade failed: cannot run the program; exiting", command=" ".join(argv), cause=str(exc))
            self.log.close()
            os._exit(1)


def _same_address(running: str, new: str) -> bool:
    """Whether two metrics_listen texts name one address: the same text, or the same IP and port written otherwise."""
    if running == new:
        return True
    try:
        a, b = parse_address(running, listen=True), parse_address(new, listen=True)
    except ValueError:
        return False
    return (a.ip or a.host, a.port) == (b.ip or b.host, b.port)


def move_to_start(fds: list[int]) -> None:
    """Put ``fds`` at 3, 4... in order, inheritable. What was there is overwritten: for just before exec."""
    end = LISTEN_FDS_START + len(fds)
    dup = getattr(fcntl, "F_DUPFD_CLOEXEC", fcntl.F_DUPFD)
    # First above every target, so that no dup2 below overwrites a descriptor still to be moved.
    high = [fcntl.fcntl(fd, dup, end) for fd in fds]
    for index, fd in enumerate(high):
        os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
        os.close(fd)
