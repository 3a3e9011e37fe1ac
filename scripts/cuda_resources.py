"""Registers, stack and shared memory of every CUDA kernel in the built extension.

    python scripts/cuda_resources.py [--so PATH] [--out DIR]

Reads the cubins that the CUDA build put into ``confusion_kernels/_C*.so`` (one per
architecture of TORCH_CUDA_ARCH_LIST, sm_80 and sm_90 by default) with
``cuobjdump -res-usage`` (the CUDA toolkit's, or the copy that ships with Triton), so
no GPU is needed. A stack frame means local-memory traffic in the kernel (spilled
registers, or arrays the compiler could not keep in registers). It fails (exit 1) when
a kernel uses a stack frame and is not in ``EXCEPTIONS`` below (each with the figures
measured and the reason it stays), or when an exception no longer needs a stack (so
the list cannot go stale). Writes ``cuda_resources.csv`` and ``cuda_resources.md``
into ``--out``; docs/benchmarks.md summarises a committed run.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import subprocess
import sys

from _audit import commit, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# regular expression on the demangled kernel name (with its template arguments) ->
# why it keeps a stack frame. Measured with this script; each must still need a stack.
EXCEPTIONS: dict[str, str] = {}


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    raise SystemExit("cuda_resources: no cuobjdump (neither on PATH nor in Triton's package)")


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def parse(text: str) -> list[dict]:
    rows, arch, name = [], None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            reg, stack, shared, local = map(int, m.groups())
            rows.append(dict(arch=arch, mangled=name, regs=reg, stack=stack, smem=shared,
                             local=local))
            name = None
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        full = names.get(r["mangled"], r["mangled"])
        r["kernel"] = full.split("(")[0].replace("confusion_kernels::", "").replace("void ", "")
    return rows


def check(rows: list[dict]) -> list[str]:
    problems = []
    used = set()
    for r in rows:
        if not (r["stack"] or r["local"]):
            continue
        allowed = [p for p in EXCEPTIONS if re.search(p, r["kernel"])]
        used.update(allowed)
        if not allowed:
            problems.append(f"{r['kernel']} {r['arch']}: {r['stack']} B stack, {r['local']} B "
                            f"local per thread ({r['regs']} registers)")
    for pattern in EXCEPTIONS:
        if pattern not in used:
            problems.append(f"exception {pattern!r} matches no kernel with a stack frame any more: "
                            "remove it")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--so", default=None, help="the extension (default: confusion_kernels/_C*.so)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "cuda-resources"))
    args = p.parse_args()
    so = args.so or next(iter(sorted(glob.glob(os.path.join(ROOT, "confusion_kernels", "_C*.so")))),
                         None)
    if not so or not os.path.exists(so):
        raise SystemExit("cuda_resources: no built extension (confusion_kernels/_C*.so)")
    text = subprocess.run([find_cuobjdump(), "-res-usage", so], capture_output=True, text=True,
                          timeout=600).stdout
    rows = parse(text)
    if not rows:
        raise SystemExit(f"cuda_resources: {so} holds no CUDA kernels (built without CUDA?)")
    rows.sort(key=lambda r: (r["kernel"], r["arch"]))
    os.makedirs(args.out, exist_ok=True)
    cols = ["kernel", "arch", "regs", "stack", "local", "smem"]
    with open(os.path.join(args.out, "cuda_resources.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    arches = sorted({r["arch"] for r in rows})
    summary = (f"{len(rows)} kernel builds ({', '.join(arches)}), "
               f"{sum(1 for r in rows if r['stack'] or r['local'])} with a stack frame, "
               f"most registers {max(r['regs'] for r in rows)}")
    with open(os.path.join(args.out, "cuda_resources.md"), "w") as f:
        f.write(f"CUDA kernels of `{os.path.basename(so)}` (`python scripts/cuda_resources.py`, "
                f"commit {commit()}): {summary}\n\n| kernel | arch | regs | stack B | static smem B |\n|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| `{r['kernel']}` | {r['arch']} | {r['regs']} | {r['stack']} | {r['smem']} |\n")
    print(summary)
    return report(check(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
