"""Tokenizer training memory: peak RSS on the bundled train split (~10 MB) and on it repeated ten times (~100 MB).

    python benchmarks/bench_tokenizer_memory.py [--vocab 8192] [--repeat 10]

Each size trains in its own process (one worker), streaming the text line by line; the ratio of the two peaks
shows whether memory follows the corpus size or only the number of unique pre-tokens (repetition adds none).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

FILES = sorted((Path(__file__).resolve().parents[1] / "corpus" / "pretrain" / "train").glob("*.txt"))


def measure(repeat: int, vocab: int) -> None:
    from scratchllm.tokenizer.bpe import Tokenizer

    def lines():
        for _ in range(repeat):
            for path in FILES:
                with open(path, encoding="utf-8") as handle:
                    yield from handle

    start = time.perf_counter()
    Tokenizer.train(lines(), vocab_size=vocab, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"{sum(p.stat().st_size for p in FILES) * repeat / 1e6:.0f} {time.perf_counter() - start:.1f} {peak_mb:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size
    args = parser.parse_args()
    if args.measure is not None:
        measure(args.measure, args.vocab)
        return
    rows = {}
    for repeat in (1, args.repeat):
        out = subprocess.run([sys.executable, __file__, "--measure", str(repeat), "--vocab", str(args.vocab)],
                             check=True, capture_output=True, text=True).stdout.split()
        rows[repeat] = (float(out[0]), float(out[1]), float(out[2]))
        print(f"corpus {rows[repeat][0]:5.0f} MB   train {rows[repeat][1]:6.1f} s   peak RSS {rows[repeat][2]:6.0f} MB")
    print(f"peak RSS ratio {args.repeat}x corpus / 1x corpus: {rows[args.repeat][2] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()
