"""What start-up would refuse beyond the file's syntax, found by asking the host: ``check_serving``.

Its own module because kiaconfig.py is a pure validator of the file, while
these checks read the user database, the modes of the file and its
directories, and whether the metrics extra is installed. Start-up, ``--check``
and reload all call it, so ``--check`` refuses what start-up refuses. It
changes nothing.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from kiaconfig import Address, Config, parse_address


def _name(cfg: Config, key: str) -> str:
    """A setting as the operator wrote it: ``--user`` on the command line, ``[gateway] user`` in the file."""
    return "--" + key.replace("_", "-") if key in cfg.from_command_line else f"[gateway] {key}"


def _where(cfg: Config, key: str) -> str:
    return f"command line: {_name(cfg, key)}" if key in cfg.from_command_line else f"{cfg.source}: {_name(cfg, key)}"


def check_serving(cfg: Config, sockets_given: bool = False) -> list[str]:
    """What start-up would refuse beyond the file's syntax, one line per problem; [] if it would start.

    Start-up, ``--check`` and reload all call it, so ``--check`` refuses what
    start-up refuses, except what depends on the moment (a port another process
    holds, a missing privilege, the sockets systemd passes: ``sockets_given``,
    when the listen lists are ignored and may be empty). It reads the user
    database and the file's mode, and changes nothing.
    """
    s = cfg.settings
    errors = []
    if not s.http_listen and not s.https_listen and not s.quic_listen and not sockets_given:
        errors.append(
            f"{cfg.source}: [gateway] http_listen and https_listen are both empty: nothing to listen on"
            " (only a gateway started by systemd socket activation, which passes the sockets, may leave them so)"
        )
    errors += _overlapping_listeners(cfg)
    if s.user:
        try:
            entry = pwd.getpwnam(s.user)
        except KeyError:
            errors.append(f"{_where(cfg, 'user')}: no such user {s.user!r}")
        else:
            problem = _unreadable_by(cfg.source, entry)
            if problem:
                errors.append(f"{_where(cfg, 'user')}: {problem}")
    if s.metrics_listen:
        errors += _metrics_problems(cfg)
    if s.quic_listen:
        errors += _quic_problems(cfg)
    return errors


QUIC_EXTRA = (
    "quic_listen needs the quic extra, the cryptography package: pip install 'kiagateway[quic]'"
    " (Debian and Ubuntu: apt install python3-cryptography; OpenBSD: pkg_add py3-cryptography)"
)


def _quic_problems(cfg: Config) -> list[str]:
    """quic_listen listing one port twice, or set without the cryptography package (it decrypts the Initials)."""
    errors = []
    seen: list[Address] = []
    for address in cfg.settings.quic_listen:  # UDP: a TCP listener on the same port is no conflict
        for other in seen:
            if listeners_overlap(address, other):
                errors.append(f"{_where(cfg, 'quic_listen')}: {address} overlaps {other}")
        seen.append(address)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        errors.append(f"{cfg.source}: {QUIC_EXTRA}")
    return errors


METRICS_EXTRA = "metrics_listen needs the metrics extra: pip install 'kiagateway[metrics]'"


def _metrics_problems(cfg: Config) -> list[str]:
    """metrics_listen overlapping a traffic listener, or set without prometheus_client (it renders the text)."""
    errors = []
    address = parse_address(cfg.settings.metrics_listen, listen=True)
    for key in ("http_listen", "https_listen"):
        for other in getattr(cfg.settings, key):
            if listeners_overlap(address, other):
                errors.append(
                    f"{_where(cfg, 'metrics_listen')}: {address} overlaps {other} of {_name(cfg, key)}: "
                    "the metrics need a port of their own"
                )
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        errors.append(f"{cfg.source}: {METRICS_EXTRA}")
    return errors


def listeners_overlap(a: Address, b: Address) -> bool:
    """True when both cannot be bound: the same port and family, and the same IP or a wildcard one.

    IPv6 listeners are bound with IPV6_V6ONLY, so "[::]:80" leaves "0.0.0.0:80"
    free; port 0 takes a free port each time.
    """
    if a.port != b.port or a.port == 0 or a.ip is None or b.ip is None or a.ip.version != b.ip.version:
        return False
    return a.ip == b.ip or a.ip.is_unspecified or b.ip.is_unspecified


def _overlapping_listeners(cfg: Config) -> list[str]:
    """One error per listen address that overlaps one listed before it, in either list.

    Binding would fail with "address in use" against the gateway's own listener,
    a message that sends the operator looking for another process.
    """
    errors = []
    seen: list[tuple[str, Address]] = []
    for key in ("http_listen", "https_listen"):
        for address in getattr(cfg.settings, key):
            for other_key, other in seen:
                if listeners_overlap(address, other):
                    if address == other and key == other_key:
                        errors.append(f"{_where(cfg, key)}: {address} is listed twice")
                    else:
                        errors.append(
                            f"{_where(cfg, key)}: {address} overlaps {other} of {_name(cfg, other_key)}: "
                            "one port serves one listener, on one address or on all of them"
                        )
                    break
            seen.append((key, address))
    return errors


READ, SEARCH = 4, 1  # the "other" permission bits: read a file, search (enter) a directory


def may_access(mode: int, owner: int, group: int, uid: int, gids: frozenset[int], want: int) -> bool:
    """Would ``uid`` with groups ``gids`` get ``want`` (READ or SEARCH) on a file of this mode and owner?

    The kernel's rule, for a user other than the one asking: the owner gets the
    owner bits only, a member of the group the group bits only, anyone else the
    other bits; root gets everything. ACLs are not read.
    """
    if uid == 0:
        return True
    if uid == owner:
        return bool(mode >> 6 & want)
    if group in gids:
        return bool(mode >> 3 & want)
    return bool(mode & want)


def _unreadable_by(path: str, entry: pwd.struct_passwd) -> str | None:
    """Why ``entry``'s user could not read ``path`` again to reload it, with the fix; None if it could.

    The user keeps only its own group: the gateway drops every supplementary
    group with its privileges. Every directory on the way must be searchable,
    both on the path as written and on the path its symlinks lead to.
    """
    user, gids = entry.pw_name, frozenset((entry.pw_gid,))
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    prefix = f"user {user} could not read {path} again"
    suffix = "so every reload (SIGHUP) would fail"
    real = os.path.realpath(path)
    directories = set(_ancestors(os.path.abspath(path))) | set(_ancestors(real))
    for directory in sorted(directories):  # a parent sorts before its children: the first one in the way
        try:
            st = os.stat(directory)
        except OSError:  # the file was just read; a directory gone since is start-up's to report
            continue
        if not may_access(st.st_mode, st.st_uid, st.st_gid, entry.pw_uid, gids, SEARCH):
            return (
                f"{prefix} (directory {directory} mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st.st_uid)}), "
                f"{suffix}: make it searchable by user {user}, e.g. chmod o+x {directory}"
            )
    try:
        st = os.stat(real)
    except OSError:
        return None
    if may_access(st.st_mode, st.st_uid, st.st_gid, entry.pw_uid, gids, READ):
        return None
    return (
        f"{prefix} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st.st_uid)}), {suffix}: "
        f"make it readable by user {user}, e.g. chgrp {group} {path} && chmod 640 {path}"
    )


def _ancestors(path: str) -> list[str]:
    """Every directory above an absolute path, up to "/"."""
    parents = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return parents
        parents.append(parent)
        path = parent


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
