"""Fused partial cross-entropy and entropy vs PyTorch: `python benchmarks/bench_losses.py [--device cuda]`.

Same as `segops bench losses`; extra arguments are passed through (--threads, --quick, --out, ...).
"""

import sys

from segops.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "losses"] + sys.argv[1:]))
