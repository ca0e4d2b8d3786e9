"""Pair the per-seed results of several ``benchmarks/accuracy.py --json`` files (runs made
in separate processes, e.g. side by side on two cores) and print each one's test
accuracy and its paired difference to the first file on the seeds they share: the 95 %
interval (t for 5-9 seeds, bootstrap above), the paired t-test's p and the minimum
effect the comparison could have detected at 80 % power (``smile_ray.stats``).

    python benchmarks/accuracy.py --config fashion_mnist --methods l2 --samples 20 --first-seed 100 --json l2.json
    python benchmarks/accuracy.py --config STUDY/best.json --samples 20 --first-seed 100 --json tuned.json
    python benchmarks/paired.py l2.json tuned.json [more.json ...] [--names "L2 defaults,SMILE tuned"]

A file holding several methods or training sizes is one arm per (method, size).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.stats import min_detectable_effect, paired_stats  # noqa: E402


def arms(path: Path) -> dict[str, dict[int, float]]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"paired.py: cannot read {path} ({e.__class__.__name__})")
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(f"{r['method']} @{r['samples_per_class']}", {})[int(r["seed"])] = 100 * r["test_acc"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--names", help="comma-separated arm names, one per arm in file order [method @size (file)]")
    args = ap.parse_args()

    named: list[tuple[str, dict[int, float]]] = []
    for f in args.files:
        for name, per_seed in arms(f).items():
            named.append((f"{name} ({f.stem})", per_seed))
    if args.names:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(named):
            sys.exit(f"paired.py: --names gives {len(names)} names for {len(named)} arms")
        named = [(n, a) for n, (_, a) in zip(names, named)]

    ref_name, ref = named[0]
    width = max(len(n) for n, _ in named)
    print(f"paired differences to: {ref_name}")
    print(f"{'arm':<{width}}  {'test acc':>14}  {'diff [95 % CI]':>24}  {'p':>5}  {'MDE80':>5}  per seed")
    for name, per_seed in named:
        seeds = sorted(per_seed)
        acc = [per_seed[s] for s in seeds]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        diff, p, mde = "", "", ""
        shared = [s for s in seeds if s in ref]
        if name != ref_name and len(shared) > 1:
            a, b = [ref[s] for s in shared], [per_seed[s] for s in shared]
            st = paired_stats(a, b)
            diff = f"{st['diff']:+.2f} [{st['ci_low']:+.2f}, {st['ci_high']:+.2f}]"
            p = f"{st['p_value']:.3f}"
            mde = f"{min_detectable_effect([y - x for x, y in zip(a, b)]):.2f}"
        print(f"{name:<{width}}  {statistics.mean(acc):6.2f} ± {sd:5.2f}  {diff:>24}  {p:>5}  {mde:>5}  "
              f"seeds {seeds[0]}-{seeds[-1]}: {' / '.join(f'{v:.2f}' for v in acc)}")

if __name__ == "__main__":
    main()
