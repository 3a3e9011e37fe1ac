"""Throughput of ClassStatistics.update (docs/math.md, "Similar labels"): the per-class
streaming statistics read the features once, so the measure is the achieved
bandwidth (feature bytes / median time) against the device's copy bandwidth
(benchmarks/roofline.py, measured once). Issue 5 target on GPU: >= 70%.

  python benchmarks/run_class_stats.py --device cuda
  python benchmarks/run_class_stats.py --device cpu --batch 65536 --features 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--features", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="write a Markdown table here")
    args = p.parse_args()

    import confusion_kernels as ck
    import roofline

    dev = args.device
    bw = roofline.measure_ceilings(dev)["bandwidth_gbs"]
    rows = []
    for b in args.batch:
        for k in args.features:
            x = torch.randn(b, k, device=dev).to(getattr(torch, args.dtype))
            y = torch.randint(0, args.classes, (b,), device=dev)
            stats = ck.ClassStatistics(args.classes, k, device=dev)
            times = []
            for i in range(args.reps + 1):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                stats.update(x, y)
                if dev == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            gbs = x.numel() * x.element_size() / med / 1e9
            rows.append((b, k, med * 1e3, gbs, gbs / bw))
            print(f"B={b} K={k} C={args.classes} {args.dtype}: {med * 1e3:.2f} ms, "
                  f"{gbs:.0f} GB/s = {100 * gbs / bw:.0f}% of the {bw:.0f} GB/s copy bandwidth", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# ClassStatistics.update throughput ({dev}, copy bandwidth {bw:.0f} GB/s)\n\n")
            f.write("| B | K | median ms | GB/s (feature bytes) | of copy bandwidth |\n|---:|---:|---:|---:|---:|\n")
            for b, k, ms, gbs, frac in rows:
                f.write(f"| {b} | {k} | {ms:.2f} | {gbs:.0f} | {100 * frac:.0f}% |\n")


if __name__ == "__main__":
    main()
