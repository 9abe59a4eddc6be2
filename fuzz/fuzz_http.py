"""libFuzzer harness for sniff.HttpSniffer, seeded with request heads (and the TLS corpus).

python fuzz/fuzz_http.py [CORPUS_DIR] [-max_total_time=SECONDS] [libFuzzer flags]
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import common

    import sniff

HERE = os.path.dirname(os.path.abspath(__file__))
TLS_SEEDS = os.path.join(HERE, os.pardir, "tests", "data", "clienthello", "*.bin")
HEADS = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET http://example.com:80/x?q HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\nbody",
    b"POST /form HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: [::1]:8080\r\nUser-Agent: curl/8\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: EXAMPLE.com.\r\nX-Fold: a\r\n b\r\n\r\n",
    b"GET https://user@example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
]


def test_one_input(data: bytes) -> None:
    common.check(sniff.HttpSniffer, data)


def main() -> None:
    corpus = common.corpus_dir_arg(os.path.join(HERE, "work-http"))
    seeds = [(f"head-{i}", head) for i, head in enumerate(HEADS)]
    seeds += [(os.path.basename(p), Path(p).read_bytes()) for p in sorted(glob.glob(TLS_SEEDS))[:3]]
    common.seed(corpus, seeds)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
