"""libFuzzer harness for httpstream.RequestStream, with a split-invariance oracle.

python fuzz/fuzz_httpstream.py [CORPUS_DIR] [-max_total_time=SECONDS] [libFuzzer flags]

Each input is the bytes of a keep-alive connection. It is fed whole, cut in two
at a point the input picks, cut in three, and (when short) one byte at a time,
under a head limit the input picks; every way must give the same requests at the
same offsets, the same error class (BadRequest or HeadTooLarge, nothing else) and
the same ``checked``. Requests must lie in order below ``checked``, each with a
normalised domain. Without atheris installed, the same oracle runs over the seeds
and random mutations of them until -max_total_time (default 60 s).
"""

from __future__ import annotations

import os
import sys

try:
    import atheris
except ImportError:  # the plain fallback below still runs the oracle
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        import common

        import httpstream
        import sniff
else:
    import common

    import httpstream
    import sniff

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET /2 HTTP/1.1\r\nHost: b.example\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 37\r\n\r\n"
    b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5;ext="v"\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.0\r\n\r\n',
    b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
]


def run(pieces, limit):
    parser = httpstream.RequestStream(limit)
    found = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while True:
                event = parser.next_event()
                if event is httpstream.NEED_MORE:
                    break
                found.append(event)
    except (sniff.BadRequest, sniff.HeadTooLarge) as exc:
        assert isinstance(exc.reason, str)
        return found, type(exc), parser.checked
    return found, httpstream.NEED_MORE, parser.checked


def test_one_input(data: bytes) -> None:
    limit = 512 + (data[0] * 7 if data else 0)
    one = (len(data) * 7919 + (data[-1] if data else 0)) % (len(data) + 1)
    two = (one * 31 + 17) % (len(data) + 1)
    a, b = sorted((one, two))
    whole = run([data], limit)
    found, _, checked = whole
    assert checked <= len(data), whole
    previous = 0
    for request in found:
        assert previous <= request.start < request.end <= checked, whole
        assert request.domain is None or sniff.normalize_domain(request.domain) == request.domain
        previous = request.end
    for pieces in ([data[:one], data[one:]], [data[:a], data[a:b], data[b:]]):
        split = run(pieces, limit)
        if split != whole:
            raise AssertionError(f"limit {limit}, cuts {[len(p) for p in pieces]}: whole {whole!r} but {split!r}")
    if len(data) <= 512:
        assert run([data[i : i + 1] for i in range(len(data))], limit) == whole


def main() -> None:
    if atheris is None:
        common.fallback(test_one_input, SEEDS, "fuzz_httpstream")
        return
    corpus = common.corpus_dir_arg(os.path.join(HERE, "work-httpstream"))
    common.seed(corpus, [(f"stream-{i}", seed) for i, seed in enumerate(SEEDS)])
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
