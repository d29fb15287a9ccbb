"""`python -m pipeline.bench [--smoke] [--out DIR] [--device auto|cpu|cuda] [--only S,..]`: the bench without the CLI.

Parses its own options so that the bench never imports `pipeline.cli` (which imports the bench);
`lca bench` is the same call. Dask's worker processes re-import `__main__` but never run this block.
"""

import argparse
import sys

from pipeline.bench.run import run_bench
from pipeline.errors import USER_ERRORS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, for CI: checks the table, not the speed")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json and scratch stores")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    args = parser.parse_args()
    try:
        run_bench(smoke=args.smoke, out=args.out, device=args.device,
                  only=[s.strip() for s in args.only.split(",") if s.strip()] if args.only else None)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
