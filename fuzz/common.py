"""Shared by the fuzz harnesses: run a sniffer, check its answer is one the module documents.

The oracle: ``feed`` returns a ``Preamble`` whose domain is None or already
normalised, or ``NEED_MORE``, or raises a ``GatewayError``; anything else
propagates and libFuzzer reports it as a crash. The same bytes fed whole and
in two pieces must give the same answer.
"""

from __future__ import annotations

import os
import sys

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
