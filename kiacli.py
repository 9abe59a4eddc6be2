"""kiagateway: route TCP connections by domain, TLS by SNI and plain HTTP by Host.

It reads only the first bytes of each connection, never decrypts TLS and
never rewrites HTTP: the bytes it read are forwarded as they came, then the
relay moves the rest both ways.

Usage:
  kiagateway [--check | --route=NAME] [--json] [--http-listen=ADDR]...
             [--https-listen=ADDR]... [--workers=N] [--log-format=FORMAT]
             [--user=NAME] [CONFIG]
  kiagateway -h | --help
  kiagateway --version

Arguments:
  CONFIG                The TOML route table [default: servers.toml].

Options:
  --http-listen=ADDR    Listen for plain HTTP on ADDR, e.g. 0.0.0.0:80 or [::]:80.
                        Repeatable; replaces the config's http_listen.
  --https-listen=ADDR   Listen for TLS on ADDR. Repeatable; replaces https_listen.
  --workers=N           Worker processes sharing the listeners, or "auto".
  --log-format=FORMAT   text or json.
  --user=NAME           Drop privileges to this user after binding.
  --check               Check CONFIG and the options as start-up would, print
                        the route table, exit 0 or 1.
  --route=NAME          Check as --check does, then print the backend a client
                        naming NAME gets on each listener and how it matched:
                        exact, wildcard (which pattern) or default. Exit 0 if
                        a listener routes it, 1 if neither does.
  --json                With --check or --route: print one JSON document
                        instead of text; for a bad config (exit 1) it is
                        {"ok": false, "errors": [...]}.
  -h --help             Show this text.
  --version             Print the version.

Exit status: 0 after a graceful stop, a good --check or a NAME routed; 1 for
a bad config, a NAME that no listener routes, a listener that cannot be bound
or a fatal error; 2 for bad usage (a NAME that is not a domain included).
Errors and warnings go to stderr: stdout holds only what --check or --route print.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys

import docopt

import kiaconfig
import kiapreflight
import kiaprocess
import kiareport
import kiaupgrade
import sniff
from kiaconfig import Config, ConfigError
from kiagateway import Gateway, __version__
from kialog import Log
from kiaprocess import FatalError


class UsageError(Exception):
    """Bad usage: main() prints the message and the usage lines, and exits 2."""


def parse_options(args: dict) -> dict[str, object]:
    """The [gateway] settings the command line sets, checked; a bad value is a UsageError."""
    overrides: dict[str, object] = {}
    for option in ("--http-listen", "--https-listen"):
        if args.get(option):
            try:
                overrides[option[2:].replace("-", "_")] = tuple(
                    kiaconfig.parse_address(a, listen=True) for a in args[option]
                )
            except ValueError as exc:
                raise UsageError(f"{option}: {exc}") from None
    workers = args.get("--workers")
    if workers:
        if workers != "auto" and not (workers.isdigit() and 0 < int(workers) <= 1024):
            raise UsageError(f"--workers must be a whole number from 1 to 1024 or auto, got {workers!r}")
        overrides["workers"] = workers if workers == "auto" else int(workers)
    log_format = args.get("--log-format")
    if log_format:
        if log_format not in kiaconfig.LOG_FORMATS:
            raise UsageError(f"--log-format must be text or json, got {log_format!r}")
        overrides["log_format"] = log_format
    if args.get("--user"):
        overrides["user"] = args["--user"]
    return overrides


def load_config(path: str, overrides: dict[str, object], sockets_given: bool = False) -> Config:
    """The file with the command line's settings over its [gateway] table, checked as start-up needs it.

    Start-up, --check and reload all come here, so --check refuses what start-up refuses.
    ``sockets_given``: systemd passes the listeners, the listen lists may be empty.
    """
    cfg = kiaconfig.override(kiaconfig.load(path), overrides)
    errors = kiapreflight.check_serving(cfg, sockets_given)
    if errors:
        raise ConfigError(errors)
    return cfg


def parse_name(text: str) -> str:
    """``--route``'s NAME as a client would send it: the A-label, normalised; a bad one is a UsageError."""
    try:
        return sniff.normalize_domain(kiaconfig.to_ascii(text))
    except ValueError as exc:
        raise UsageError(f"--route: {text!r} is not a valid domain ({exc})") from None


def _print_answer(text: str, status: int) -> int:
    """Write what --check or --route print and return ``status``; 1 if the reader left early.

    A reader that stops reading (``| head -1``) is no error of ours: no
    traceback, and stdout goes to /dev/null so the flush at exit fails no more.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_left()
    return status


def _reader_left() -> int:
    """Exit status 1, quietly, for a reader that left early: stdout goes to /dev/null, so the flush at exit
    fails no more."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def _json(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # One usage line holds the repeatable options: docopt-ng appends their
        # values again for each usage line it tries (jazzband/docopt-ng#60).
        args = docopt.docopt(__doc__, argv=argv, version=f"kiagateway {__version__}")
        overrides = parse_options(args)
        name = None if args["--route"] is None else parse_name(args["--route"])
        if args["--json"] and not (args["--check"] or name is not None):
            raise UsageError("--json goes with --check or --route")
    except docopt.DocoptExit as exc:
        return _bad_usage(_usage_problem(argv, str(exc.code)))
    except UsageError as exc:
        return _bad_usage(str(exc))
    except SystemExit as exc:  # --help and --version print and exit
        return _print_answer("", 0 if exc.code in (None, 0) else 2)  # what print() left in the buffer
    except BrokenPipeError:  # --help or --version to a reader that left early (| head -1), as for --check
        return _reader_left()
    path = args["CONFIG"] or "servers.toml"
    log = Log(overrides.get("log_format", "text"))
    if args["--check"] or name is not None:  # an upgrade's check of a socket-activated gateway says so
        systemd = os.environ.get(kiaupgrade.SYSTEMD_SOCKETS) == "1"
    else:
        systemd = kiaupgrade.sockets_from_systemd()
    try:
        cfg = load_config(path, overrides, systemd)
    except ConfigError as exc:
        for line in exc.errors:
            log.error(line)
        if args["--json"]:
            return _print_answer(_json({"ok": False, "errors": exc.errors}), 1)
        return 1
    if args["--check"] or name is not None:
        for warning in cfg.warnings:
            log.warning(warning)
        out = io.StringIO()
        if name is not None:
            report = kiareport.route_report(cfg, name)
            if args["--json"]:
                out.write(_json(report))
            else:
                kiareport.print_route(cfg, name, out)
            return _print_answer(out.getvalue(), 0 if report["routed"] else 1)
        if args["--json"]:
            out.write(_json(kiareport.plain_config(cfg)))
        else:
            kiareport.print_routes(cfg, out)
        return _print_answer(out.getvalue(), 0)
    log = Log(cfg.settings.log_format)
    log.setup()  # stderr opened again now: once run() drops privileges, it may no longer be ours to open
    try:
        return kiaprocess.run(cfg, lambda: load_config(path, overrides, systemd), Gateway, log, __version__)
    except FatalError as exc:
        log.error(str(exc))
        return 1


def _bad_usage(sentence: str) -> int:
    """Exit status 2 with one plain sentence and the usage lines, on stderr."""
    usage = __doc__[__doc__.index("Usage:") : __doc__.index("\n\n", __doc__.index("Usage:"))]
    sys.stderr.write(f"kiagateway: {sentence} (see kiagateway --help)\n{usage}\n")
    return 2


def _usage_problem(argv: list[str], message: str) -> str:
    """One plain sentence for what docopt refused, without the reprs of its internals it prints."""
    first = message.split("\n", 1)[0]
    if first and not first.startswith(("Warning:", "Usage:")):
        return first  # docopt's own sentences: "--workers requires argument"
    options = re.findall(r"^ +(?:(-\w) )?(--[a-z-]+)(=?)", __doc__[__doc__.index("Options:") :], re.MULTILINE)
    shorts = {short: long for short, long, _ in options if short}
    longs = [long for _, long, _ in options]
    with_value = {long for _, long, takes in options if takes}
    repeatable = set(re.findall(r"\[(--[a-z-]+)=\w+\]\.\.\.", __doc__))
    given: list[str] = []
    arguments: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            arguments += words
            break
        if word.startswith("--"):
            name, equals, _ = word.partition("=")
            matches = [name] if name in longs else [long for long in longs if long.startswith(name)]
            if len(matches) != 1:  # docopt takes a unique prefix, and nothing else
                return f"unknown option {name}"
            given += matches
            if matches[0] in with_value and not equals:
                next(words, None)  # "--workers 2": the value is the next word
        elif word.startswith("-") and word != "-":
            for letter in word[1:]:
                if f"-{letter}" not in shorts:
                    return f"unknown option -{letter}"
                given.append(shorts[f"-{letter}"])
        else:
            arguments.append(word)
    if "--check" in given and "--route" in given:
        return "--check or --route, not both: --route checks the config too"
    for option in given:
        if option not in repeatable and given.count(option) > 1:
            return f"{option} given more than once"
    if len(arguments) > 1:
        return f"one CONFIG file at most, got {', '.join(map(repr, arguments))}"
    return f"these arguments fit no usage line: {' '.join(argv)}"


if __name__ == "__main__":
    sys.exit(main())
