"""libFuzzer harness for proxyproto.ProxyHeaderReader, seeded with v1 and v2 headers.

python fuzz/fuzz_proxy.py [CORPUS_DIR] -dict=fuzz/proxy.dict [-max_total_time=SECONDS] [libFuzzer flags]

The oracle: ``feed`` returns a ``ProxyHeader`` (canonical addresses, real
ports, a length within the input), ``NEED_MORE`` or raises ``BadProxyHeader``;
the same answer whole and split in two; a header read alone (without what
follows it) gives the same answer, and one byte less of it asks for more.
"""

from __future__ import annotations

import ipaddress
import os
import sys

import atheris

with atheris.instrument_imports():
    import common

    import proxyproto

HERE = os.path.dirname(os.path.abspath(__file__))
SIG = proxyproto.V2_SIGNATURE
SEEDS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 1 65535\r\n\x16\x03\x01",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ::1 65535 65535\r\n",
    SIG + b"\x21\x11\x00\x0c\xc0\x00\x02\x01\xc6\x33\x64\x02\x9c\x40\x01\xbb" + b"GET /",
    SIG + b"\x21\x21\x00\x24" + bytes(range(32)) + b"\x9c\x40\x01\xbb",
    SIG + b"\x21\x11\x00\x15\xc0\x00\x02\x01\xc6\x33\x64\x02\x9c\x40\x01\xbb\x01\x00\x02h2\x04\x00\x00",
    SIG + b"\x20\x00\x00\x00",
    SIG + b"\x21\x31\x00\xd8" + bytes(216),
]


def outcome(reader: proxyproto.ProxyHeaderReader, pieces: list[bytes]):
    try:
        for piece in pieces:
            result = reader.feed(piece)
            if result is not proxyproto.NEED_MORE:
                return result
    except proxyproto.BadProxyHeader as exc:
        assert isinstance(exc.reason, str)
        return proxyproto.BadProxyHeader
    return result


def test_one_input(data: bytes) -> None:
    cut = (len(data) * 7919 + (data[-1] if data else 0)) % (len(data) + 1)
    limit = proxyproto.MAX_PREAMBLE
    if data and data[-1] & 0x20:  # one input in two: a limit near the input's size
        limit = max(1, len(data) - data[-1] % 64)
    whole = outcome(proxyproto.ProxyHeaderReader(limit), [data])
    split = outcome(proxyproto.ProxyHeaderReader(limit), [data[:cut], data[cut:]])
    if whole != split:
        raise AssertionError(f"limit {limit}, cut {cut}: whole {whole!r} but split {split!r}")
    if whole is proxyproto.NEED_MORE or whole is proxyproto.BadProxyHeader:
        return
    assert type(whole) is proxyproto.ProxyHeader, whole
    assert 15 <= whole.length <= len(data), whole
    assert (whole.source is None) == (whole.destination is None), whole
    v4 = data[6:10] == b"TCP4" if data.startswith(b"PROXY ") else data[13] == 0x11
    for address in (whole.source, whole.destination):
        if address is not None:
            ip = ipaddress.ip_address(address[0])
            assert str(ip) == address[0] and 0 <= address[1] <= 65535, whole
            assert (ip.version == 4) == v4, whole
    assert outcome(proxyproto.ProxyHeaderReader(limit), [data[: whole.length]]) == whole
    assert outcome(proxyproto.ProxyHeaderReader(limit), [data[: whole.length - 1]]) is proxyproto.NEED_MORE


def main() -> None:
    corpus = common.corpus_dir_arg(os.path.join(HERE, "work-proxy"))
    common.seed(corpus, [(f"header-{i}", seed) for i, seed in enumerate(SEEDS)])
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
