"""python -m bench: time the registered families, print the tables, write CSV rows and plots."""
import argparse
import importlib
import sys
from pathlib import Path

from . import FAMILIES, harness  # harness first: it sets THP_MEM_ALLOC_ENABLE before torch loads

import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="few cases, 5 repeats (the default; for the README)")
    mode.add_argument("--full", dest="quick", action="store_false",
                      help="every case and dtype, 20 repeats, no time limit")
    p.add_argument("--family", action="append", choices=sorted(FAMILIES),
                   help="family to run (repeatable; default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--csv-dir", type=Path, default=harness.RESULTS_DIR,
                   help="where CSV rows are appended and plots written (default bench/results)")
    p.add_argument("--numel", type=int, help="elements per tensor (default 16M)")
    p.add_argument("--repeats", type=int, help="timed calls per provider (default 5 / 20)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which a slow provider stops repeating (default: 2 in "
                        "quick mode, none in full mode: every provider runs all its repeats)")
    p.add_argument("--providers", help="comma-separated provider names to keep (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--case", action="append",
                   help="keep only the cases whose kernel name contains this text (repeatable)")
    return p.parse_args(argv)


def family_cases(name: str, args) -> list:
    module = importlib.import_module(FAMILIES[name])
    kwargs = {"device": args.device, "quick": args.quick}
    if args.numel:
        kwargs["numel"] = args.numel
    cases = module.cases(**kwargs)
    if args.case:
        cases = [c for c in cases if any(text in c.kernel for text in args.case)]
    return cases


def main(argv=None) -> int:
    """0 unless a pypaper provider raised: missing or failing peers are reported, not fatal."""
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    timing = harness.Timing(repeats=args.repeats or (5 if args.quick else 20),
                            warmup=1 if args.quick else 2,
                            budget_s=args.budget if args.budget is not None else
                            (2.0 if args.quick else float("inf")))
    only = set(args.providers.split(",")) if args.providers else None
    limits = harness.measure_limits(args.device)
    failed = False
    for name in args.family or list(FAMILIES):
        report = harness.run_family(name, family_cases(name, args), args.device, timing,
                                    args.csv_dir, not args.no_plot, not args.no_progress, only,
                                    limits)
        print(report.markdown, flush=True)
        print(f"\nCSV: {report.csv_path}" + (f"  plot: {report.png_path}" if report.png_path else ""))
        failed |= any(r.error and r.provider.startswith("pypaper") for r in report.results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
