"""libFuzzer harness for sniff.TlsSniffer, seeded from tests/data/clienthello/.

python fuzz/fuzz_tls.py [CORPUS_DIR] [-max_total_time=SECONDS] [libFuzzer flags]
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
SEEDS = os.path.join(HERE, os.pardir, "tests", "data", "clienthello", "*.bin")


def test_one_input(data: bytes) -> None:
    common.check(sniff.TlsSniffer, data)


def main() -> None:
    corpus = common.corpus_dir_arg(os.path.join(HERE, "work-tls"))
    common.seed(corpus, ((os.path.basename(p), Path(p).read_bytes()) for p in sorted(glob.glob(SEEDS))))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
