"""Test accuracy of methods over seeds (mean +- std, and the paired difference to the
first method with its 95 % bootstrap interval), in-process.

    python benchmarks/accuracy.py                                # l2, mixup, smile at 2 and 5 per class, 5 seeds
    python benchmarks/accuracy.py --config fashion_mnist --samples 5,20   # ImageNet EfficientNet-Lite0 -> Fashion-MNIST
    python benchmarks/accuracy.py --methods smile --samples 5 --seeds 3 --set mixup_alpha=0.5
    python benchmarks/accuracy.py --config runs/study/best.json --samples 20 --first-seed 100   # a tuned config on fresh seeds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.config import load_config_values, make_config, parse_overrides  # noqa: E402
from smile_ray.metrics import IL_METRICS  # noqa: E402
from smile_ray.recipe import train  # noqa: E402
from smile_ray.stats import paired_stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="l2,mixup,smile")
    ap.add_argument("--samples", default="2,5", help="samples_per_class values")
    ap.add_argument("--seeds", type=int, default=5, help="seeds FIRST..FIRST+K-1")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="first seed (e.g. 100 to evaluate a tuned config on seeds it was not tuned on)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--config", type=Path, help="base config file (e.g. a study's best.json); --methods defaults to its method")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base = load_config_values(args.config) if args.config else {}
    base.update(parse_overrides(args.overrides))
    if args.config and args.methods == ap.get_default("methods") and "method" in base:
        args.methods = base["method"]
    rows = []
    first = args.methods.split(",")[0]
    for spc in [int(s) for s in args.samples.split(",")]:
        for method in args.methods.split(","):
            accs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                cfg = make_config({**base, "method": method, "samples_per_class": spc, "seed": seed})
                m = train(cfg, None, log=lambda msg: print(msg, file=sys.stderr))
                accs.append(m["test_acc"])
                rows.append({"method": method, "samples_per_class": spc, "seed": seed, "test_acc": m["test_acc"],
                             "val_acc": m["val_acc"], "test_ece": m["test_ece"], "seconds": m["seconds"],
                             **{k: m[k] for k in IL_METRICS if k in m}})
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ref = [100 * r["test_acc"] for r in rows if r["samples_per_class"] == spc and r["method"] == first]
            vs = ""
            if method != first and len(accs) > 1:
                st = paired_stats(ref, [100 * a for a in accs])
                vs = f"  vs {first}: {st['diff']:+.2f} [{st['ci_low']:+.2f}, {st['ci_high']:+.2f}] p={st['p_value']:.3f}"
            print(f"{method:<6} samples_per_class={spc}: test_acc {100 * statistics.mean(accs):.2f} +- {100 * sd:.2f}{vs}  "
                  f"(seeds: {' '.join(f'{100 * a:.1f}' for a in accs)}; {statistics.mean(r['seconds'] for r in rows[-len(accs):]):.0f} s/run)",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
