"""Time the training step of l2, mixup and smile (and smile minus each component).

Every variant runs the library's own ``train_step`` on the same pre-built batches, in
interleaved rounds (so drift in machine load hits all variants alike); the figure per
variant is the median over rounds of the mean step time. Needs only torch and
torchvision (no Ray, no MLflow), so it runs on a bare GPU box too.

With ``--files`` or ``--compile`` each variant is timed in one block instead: its
warm-up (the compile), then ``2 x workers + 2`` untimed steps that drain the batches
its DataLoader queued while it was not consuming, then ``rounds x steps`` timed steps
(rounds are consecutive segments of the block), then its workers stop. Interleaved,
each variant's DataLoader would prefetch while the other was timed and start its round
with a full queue (issue 30 estimated up to 35 % optimistic); and a block's figure is
printed (and ``--json`` rewritten) as soon as it ends, so a time limit that stops a
later variant's compile keeps the earlier figures.

    python benchmarks/step_time.py                       # digits_cnn, 32 px, batch 48, CPU
    python benchmarks/step_time.py --full                # + source pre-training and a default train run
    python benchmarks/step_time.py --backbone resnet50 --image-size 224 --batch-size 64 \\
        --synthetic --device cuda --precision bf16 --channels-last
    python benchmarks/step_time.py --backbone efficientnet_lite0 --image-size 64 --synthetic \\
        --variants plain,l2,smile --steps 5 --rounds 5 --warmup 3
    python benchmarks/step_time.py --variants l2,mixup,smile,l2sp,delta,bss,cotuning,rifle,stochnorm,lwf,regsl

On a GPU, the issue's two ResNet-50 figures (synthetic batches, then the real file
pipeline: 500x375 JPEGs decoded and augmented by DataLoader workers, pinned, copied):

    python benchmarks/step_time.py --backbone resnet50 --image-size 224 --batch-size 48 --device cuda \
        --precision bf16 --channels-last --variants l2,smile --synthetic
    python benchmarks/step_time.py --backbone resnet50 --image-size 224 --batch-size 48 --device cuda \
        --precision bf16 --channels-last --variants l2,smile --files generate --data-workers 8
    python benchmarks/step_time.py --backbone resnet50 --image-size 224 --batch-size 48 --device cuda \
        --variants l2,smile --synthetic --compile     # the CUDA defaults (bf16, channels_last) + torch.compile
    python benchmarks/step_time.py ... --files DIR --decode device           # nvJPEG decoding on the GPU
    python benchmarks/step_time.py ... --compile --compile-mode reduce-overhead  # CUDA graphs

``benchmarks/gpu.sh`` runs all of these in one call on a lent GPU.

``plain`` is the floor: the bare backbone and a linear head, ``F.cross_entropy`` and
``torch.optim.SGD``, written here without any smile-ray code.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.config import make_config  # noqa: E402
from smile_ray.data.images import auto_workers  # noqa: E402
from smile_ray.paths import default_cache_dir  # noqa: E402
from smile_ray.models import build_source_model  # noqa: E402
from smile_ray.recipe import resolve_device, setup, train, train_step, uses_bf16, uses_channels_last  # noqa: E402
from smile_ray.registry import METHODS  # noqa: E402

VARIANTS = {
    "plain": {"method": "l2"},  # the config only builds the batches; the step is below
    "l2": {"method": "l2"},
    "mixup": {"method": "mixup"},
    "smile": {"method": "smile"},
    "smile -feature_mixup": {"method": "smile", "feature_mixup": False},
    "smile -source_label": {"method": "smile", "source_label": False},
    "smile -mean_teacher": {"method": "smile", "mean_teacher": False},
    "smile -label_mixup": {"method": "smile", "label_mixup": False},
    "smile -head_l2": {"method": "smile", "head_l2": False},
}


class SyntheticTask:
    """Random images on the device: times the step alone, with no data pipeline (the part
    of :class:`smile_ray.data.Task` that set-up and the steps use)."""

    builds_ahead = True  # nothing to build: no Prefetcher

    def __init__(self, batch_size, channels, size, num_classes, device):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(batch_size, channels, size, size, generator=g).to(device)
        self.y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.num_classes, self.in_channels = num_classes, channels

    def train_batch(self, step, batch_size, rank=0, world_size=1):
        return self.x, self.y

    def train_on(self, device):
        pass  # already there


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: Path, key: str | None, results: dict) -> None:
    """``results`` to ``path``, or under ``key`` of the JSON object there (made if absent)."""
    if key:
        whole = json.loads(path.read_text()) if path.exists() else {}
        whole[key] = results
        results = whole
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)  # a step killed mid-write leaves the previous file whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="digits_cnn")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the config key's values [auto: bf16 autocast on GPUs of compute capability 8.0 or "
                    "more, fp32 elsewhere]")
    ap.add_argument("--channels-last", default="auto", nargs="?", const="true", choices=["auto", "true", "false"],
                    help="the config key's values; the bare flag means true [auto: on for CUDA]")
    ap.add_argument("--compile", action="store_true", help="compile=true: torch.compile the student and the teacher "
                    "(the compile happens in the warm-up steps)")
    ap.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead"],
                    default="default", help="with --compile: torch.compile's mode, applied as its Inductor options "
                    "for the whole process (the library compiles with the default mode)")
    ap.add_argument("--decode", choices=["auto", "cpu", "device"], default="auto",
                    help="the config key, for --files: cpu (PIL in the workers) or device (the workers read bytes, "
                         "torchvision decodes on the run's device)")
    ap.add_argument("--synthetic", action="store_true", help="random batches (required for backbones other than digits_cnn)")
    ap.add_argument("--files", metavar="DIR",
                    help="time every step through the real file pipeline (decode, augment, DataLoader workers, "
                         "pinned copy) instead of pre-built batches: an image_folder tree at DIR, or 'generate' "
                         "for --file-images generated 500x375 JPEGs (random init weights; speed only)")
    ap.add_argument("--file-images", type=int, default=960)
    ap.add_argument("--data-workers", type=int, default=-1, help="DataLoader workers for --files [-1: automatic]")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of: " + ", ".join(VARIANTS) + ", or any method (l2sp, bss, ...)")
    ap.add_argument("--full", action="store_true", help="also time source pre-training and a default `train` run")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    ap.add_argument("--json-key", help="with --json: keep the file's other keys and put the figures under this one "
                    "(several runs in one file; benchmarks/gpu.sh)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="source-model cache [smile-ray's default]")
    args = ap.parse_args()

    device = resolve_device(args.device)
    if args.compile and args.compile_mode != "default":
        import torch._inductor as inductor

        # what torch.compile(mode=...) sets, for every compile of this process
        inductor.config.patch(inductor.list_mode_options(args.compile_mode)).__enter__()
    files_root = None
    if args.files == "generate":
        import tempfile

        from input_pipeline import write_tree  # benchmarks/input_pipeline.py

        files_root = Path(tempfile.mkdtemp(prefix="smile-ray-step-files-"))
        t = time.perf_counter()
        write_tree(files_root, args.file_images, 10, 500, 375)
        print(f"wrote {args.file_images} 500x375 JPEGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    elif args.files:
        files_root = Path(args.files)
    cache = args.cache_dir or default_cache_dir()

    def dump(results: dict) -> None:
        write_json(args.json, args.json_key, results)

    results: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args) | {"json": None}}

    if args.full:
        from smile_ray.data.digits import digits_source
        from smile_ray.pretrain import pretrain_source

        t = time.perf_counter()
        _, info = pretrain_source(digits_source(make_config()), "digits_cnn")
        results["pretrain_seconds"] = time.perf_counter() - t
        print(f"source pre-training (digits 0-4, digits_cnn): {results['pretrain_seconds']:.1f} s, "
              f"held-out source accuracy {info['source_val_acc']:.3f}")

    base = {
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "precision": args.precision, "channels_last": args.channels_last, "device": str(device),
        "compile": args.compile,
        "steps": 10**7,  # every timed step is in the regularised phase, before the lr drop
        "weights": "none" if args.synthetic or files_root else "source",
    }
    if files_root:
        base.update(dataset="image_folder", data_root=str(files_root), sample_rate=1.0, data_workers=args.data_workers,
                    decode=args.decode)
    names = [v.strip() for v in args.variants.split(",")]
    for name in names:  # any registered method is a variant of its own name (the baselines)
        if name not in VARIANTS:
            METHODS.check(name)
            VARIANTS[name] = {"method": name}
    runs, batches = {}, None
    for name in names:
        cfg = make_config({**base, **VARIANTS[name]})
        task = None
        if args.synthetic:
            task = SyntheticTask(args.batch_size, 3 if args.backbone != "digits_cnn" else 1, args.image_size, 10, device)
        runs[name] = setup(cfg, cache, device=device, task=task, log=lambda m: print(m, file=sys.stderr))
        if batches is None and not files_root:
            n = args.warmup + args.steps
            batches = [runs[name].to_device(*runs[name].task.train_batch(s, args.batch_size)) for s in range(n)]

    plain = None
    if "plain" in names:
        torch.manual_seed(0)
        source = build_source_model(args.backbone, 10).to(device).train()
        head = torch.nn.Linear(source.fc.in_features, 10).to(device)
        net = torch.nn.Sequential(source.body, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)
        if uses_channels_last(runs["plain"].config, device):
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)

        def plain_step(x, y):
            if x.shape[1] == 1 and args.backbone != "digits_cnn":
                x = x.expand(-1, 3, -1, -1)
            with runs["plain"].autocast():  # the precision the library's steps run at
                loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        plain = plain_step

    def time_steps(run, steps, offset, name=None):
        sync(device)
        t = time.perf_counter()
        for i, s in enumerate(steps):
            # --files: each step's batch comes through the run's own pipeline, as in training
            x, y = run.to_device(*run.task.train_batch(offset + i, args.batch_size)) if files_root else batches[s % len(batches)]
            if name == "plain":
                plain(x, y)
            else:
                train_step(run, offset + i, x, y)
        sync(device)
        return (time.perf_counter() - t) / len(steps)

    first = runs[names[0]]
    print(f"\n{args.backbone} {args.image_size}px batch {args.batch_size} on {device} "
          f"({'bf16' if uses_bf16(first.config, device) else 'fp32'}"
          f"{', channels_last' if uses_channels_last(first.config, device) else ''}"
          f"{', compile ' + args.compile_mode if args.compile else ''}), median of {args.rounds} rounds x {args.steps} steps"
          f"{', batches through the file pipeline (decode ' + args.decode + ')' if files_root else ''}"
          f"{', each variant in one block' if files_root or args.compile else ', interleaved rounds'}")
    print(f"{'variant':<22} {'ms/step':>9} {'img/s':>9} {'vs l2':>7}", flush=True)
    results["variants"] = {}

    def report(name, per_round):
        ms = 1000 * statistics.median(per_round)
        ref = results["variants"].get("l2", {}).get("ms_per_step")
        ratio = 1.0 if name == "l2" else ms / ref if ref else float("nan")
        results["variants"][name] = {"ms_per_step": ms, "images_per_s": args.batch_size / ms * 1000, "ratio_to_l2": ratio,
                                     "rounds_ms": [1000 * t for t in per_round]}
        print(f"{name:<22} {ms:>9.2f} {args.batch_size / ms * 1000:>9.0f} {ratio:>7.3f}", flush=True)
        if args.json:  # rewritten after each variant: a later one that runs out of time keeps these
            dump(results)

    if files_root or args.compile:
        if "l2" in names:  # first, so that the others' ratios have their reference
            names = ["l2"] + [n for n in names if n != "l2"]
        workers = auto_workers(first.config)
        for name in names:
            run = runs[name]
            time_steps(run, range(args.warmup), 0, name)  # allocator, kernels, caches, the compile
            drain = 2 * workers + 2 if files_root else 0  # the DataLoader's queue (prefetch_factor 2 per worker)
            if drain:
                time_steps(run, range(args.warmup, args.warmup + drain), args.warmup, name)
            start = args.warmup + drain
            per_round = [time_steps(run, range(start + r * args.steps, start + (r + 1) * args.steps),
                                    start + r * args.steps, name) for r in range(args.rounds)]
            getattr(run.task, "close", lambda: None)()  # its workers stop competing for the CPUs
            report(name, per_round)
    else:
        for name in names:  # warm-up: allocator, kernels, caches
            time_steps(runs[name], range(args.warmup), 0, name)
        per_round = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names:
                timed = range(args.warmup, args.warmup + args.steps)
                per_round[name].append(time_steps(runs[name], timed, args.warmup + r * args.steps, name))
        for name in ["l2"] + [n for n in names if n != "l2"] if "l2" in names else names:
            report(name, per_round[name])

    if args.full:
        cfg = make_config({"device": str(device)})
        t = time.perf_counter()
        m = train(cfg, None, cache_dir=cache, log=lambda msg: None)
        results["train_seconds"] = time.perf_counter() - t
        results["train_test_acc"] = m["test_acc"]
        print(f"\ndefault `train` run (smile, digits, {cfg.steps} steps, source model cached): "
              f"{results['train_seconds']:.1f} s wall, test_acc {m['test_acc']:.3f}")
    if args.json:
        dump(results)
    for run in runs.values():
        getattr(run.task, "close", lambda: None)()  # the file pipeline's DataLoader workers
    if args.files == "generate":
        import shutil

        shutil.rmtree(files_root, ignore_errors=True)


if __name__ == "__main__":
    main()
