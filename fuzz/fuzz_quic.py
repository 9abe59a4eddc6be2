"""libFuzzer harness for quicsniff.InitialSniffer, fuzzing what is inside the encryption.

python fuzz/fuzz_quic.py [CORPUS_DIR] [-max_total_time=SECONDS] [libFuzzer flags]

Random datagrams never get past the AEAD, so the input is the plaintext: the
frames of a client's Initial packets. It is cut into packets at points the
input picks, each packet is sealed with the client's Initial keys, and the
packets are fed three ways: coalesced in one datagram, one per datagram, and
one per datagram in reverse order. Each way must end in a ``Preamble`` (domain
None or normalised), ``NEED_MORE``, ``ClientClosed`` or a ``GatewayError``,
and the first two ways must give the same answer (the sniffer judges after
each packet, so how packets share datagrams changes nothing). Without atheris the same oracle runs over the seeds
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

        import kiaerrors
        import quicsniff
        import sniff
else:
    import common

    import kiaerrors
    import quicsniff
    import sniff

HERE = os.path.dirname(os.path.abspath(__file__))
DCID = bytes.fromhex("8394c8f03e515708")
CLIENT_KEYS, _ = quicsniff.initial_keys(quicsniff.VERSION_1, DCID)


def _seeds() -> list[bytes]:
    """Frames carrying real ClientHellos: the TLS corpus's handshake messages in one or two CRYPTO frames."""
    seeds = []
    corpus = os.path.join(HERE, os.pardir, "tests", "data", "clienthello")
    for name in sorted(os.listdir(corpus)):
        if not name.endswith(".bin"):
            continue
        with open(os.path.join(corpus, name), "rb") as file:
            record = file.read()
        if record[0] != 22:
            continue
        message, pos = b"", 0
        while pos + 5 <= len(record):
            length = int.from_bytes(record[pos + 3 : pos + 5], "big")
            message += record[pos + 5 : pos + 5 + length]
            pos += 5 + length
        half = len(message) // 2
        seeds.append(_crypto(0, message))
        seeds.append(b"\x01" + _crypto(half, message[half:]) + b"\x02\x00\x00\x00\x00" + _crypto(0, message[:half]))
    return seeds


def _crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + quicsniff.encode_varint(offset) + quicsniff.encode_varint(len(data)) + data


def run(datagrams: list[bytes]) -> object:
    sniffer = quicsniff.InitialSniffer()
    result = sniff.NEED_MORE
    try:
        for datagram in datagrams:
            result = sniffer.feed(datagram)
    except (kiaerrors.GatewayError, quicsniff.ClientClosed, quicsniff.NotInitial) as exc:
        return type(exc)
    if result is not sniff.NEED_MORE:
        assert type(result) is sniff.Preamble, result
        assert result.domain is None or sniff.normalize_domain(result.domain) == result.domain, result
    return result


def test_one_input(data: bytes) -> None:
    cuts = sorted({(len(data) * k * 7919 + (data[-1] if data else 0)) % (len(data) + 1) for k in range(1, 4)})
    payloads = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    seal = quicsniff.seal_initial
    packets = [seal(CLIENT_KEYS, quicsniff.VERSION_1, DCID, b"", n, payload) for n, payload in enumerate(payloads)]
    pad = lambda datagram: datagram + bytes(max(0, 1200 - len(datagram)))  # noqa: E731
    coalesced = run([pad(b"".join(packets))])
    separate = run([pad(packet) for packet in packets])
    if coalesced != separate:
        raise AssertionError(f"cuts {cuts}: coalesced {coalesced!r} but separate {separate!r}")
    run([pad(packet) for packet in reversed(packets)])


def main() -> None:
    if atheris is None:
        common.fallback(test_one_input, _seeds(), "fuzz_quic")
        return
    corpus = common.corpus_dir_arg(os.path.join(HERE, "work-quic"))
    common.seed(corpus, [(f"frames-{i}", seed) for i, seed in enumerate(_seeds())])
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
