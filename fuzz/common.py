"""Shared by the fuzz harnesses: run a sniffer, check its answer is one the module documents.

The oracle: ``feed`` returns a ``Preamble`` whose domain is None or already
normalised, or ``NEED_MORE``, or raises a ``GatewayError``; anything else
propagates and libFuzzer reports it as a crash. The same bytes fed whole and
in two pieces must give the same answer.
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import kiaerrors
import sniff


def outcome(sniffer, pieces):
    try:
        for piece in pieces:
            result = sniffer.feed(piece)
            if result is not sniff.NEED_MORE:
                break
    except kiaerrors.GatewayError as exc:
        assert isinstance(exc.reason, str)
        return type(exc)
    if result is sniff.NEED_MORE:
        return result
    assert type(result) is sniff.Preamble, result
    if result.domain is not None:
        assert sniff.normalize_domain(result.domain) == result.domain, result
    return result


def check(sniffer_class, data: bytes) -> None:
    """Whole vs split, under the default limit or (one input in two) one near the input's size."""
    cut = (len(data) * 7919 + (data[-1] if data else 0)) % (len(data) + 1)
    limit = sniff.MAX_PREAMBLE
    if data and data[0] & 0x20:
        limit = max(1, len(data) - data[-1] % 32)
    whole = outcome(sniffer_class(limit), [data])
    split = outcome(sniffer_class(limit), [data[:cut], data[cut:]])
    if whole != split:
        raise AssertionError(f"limit {limit}, cut {cut}: whole {whole!r} but split {split!r}")


def seed(corpus_dir: str, inputs) -> None:
    """Fill an empty working corpus directory with the seeds."""
    if os.path.isdir(corpus_dir) and os.listdir(corpus_dir):
        return
    os.makedirs(corpus_dir, exist_ok=True)
    for name, data in inputs:
        with open(os.path.join(corpus_dir, name), "wb") as f:
            f.write(data)


def corpus_dir_arg(default: str) -> str:
    dirs = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if not dirs:
        sys.argv.append(default)
        return default
    return dirs[0]


def fallback(test_one_input, seeds: list[bytes], name: str) -> None:
    """Without atheris: the oracle over the files named on the command line, or over random mutations of the
    seeds until -max_total_time (default 60 s; SEED picks the sequence)."""
    budget = 60.0
    for arg in sys.argv[1:]:
        if arg.startswith("-max_total_time="):
            budget = float(arg.split("=", 1)[1])
    files = [arg for arg in sys.argv[1:] if not arg.startswith("-") and os.path.isfile(arg)]
    if files:
        for path in files:
            with open(path, "rb") as f:
                test_one_input(f.read())
        return
    rng = random.Random(int(os.environ.get("SEED", "0")))
    deadline, runs = time.monotonic() + budget, 0
    while time.monotonic() < deadline:
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(0, 4)):
            at = rng.randrange(len(data) + 1)
            roll = rng.random()
            if roll < 0.4:
                data[at:at] = bytes([rng.randrange(256)])
            elif roll < 0.7 and at < len(data):
                data[at] = rng.randrange(256)
            elif roll < 0.85:
                data[at:at] = rng.choice(seeds)
            else:
                del data[at : at + rng.randint(1, 8)]
        test_one_input(bytes(data))
        runs += 1
    print(f"{name} fallback: {runs} inputs, no failure")
