"""``python -m confusion_kernels demo``: trains six methods on imbalanced digits, writes a
Markdown report with figures to --out, and prints where it is."""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_OUT = "confusion_report"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"the demo runs on cpu or cuda, got {text!r}")
    return text


def _out_folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the report folder must be a path, got ''")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m confusion_kernels demo",
        description="Train CE, CE + ASLoss, Affinity and CE + NCL on imbalanced digits and "
                    "write a Markdown report (results table with retrieval MAP@R and recall@k, "
                    "2-D representations, confusion matrices, similar labels, "
                    "out-of-distribution AUROC, kernel speed).")
    p.add_argument("--out", type=_out_folder, default=DEFAULT_OUT,
                   help=f"report folder (default ./{DEFAULT_OUT}/)")
    p.add_argument("--device", type=_device, default="cpu",
                   help="cpu or cuda (cuda runs the GPU kernels)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed and 25 epochs instead of 3 and 60 (under a minute on 2 CPU cores)")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="seeds of the results table (3; 1 with --quick)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (60; 25 with --quick)")
    p.add_argument("--dim", type=_positive_int, default=16,
                   help="representation size of the table's runs")
    p.add_argument("--backend", default="auto", help="kernel backend of the losses")
    return p


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _requirements() -> None:
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"),
                            ("tqdm", "tqdm")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise SystemExit(f"the demo needs {', '.join(missing)}: pip install "
                         f"'confusion-kernels[demo]' (or bash scripts/install.sh demo)")


def main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    _requirements()
    from tqdm import tqdm

    import confusion_kernels as ck

    from . import data, evaluation, report, speed, training

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    epochs = args.epochs if args.epochs is not None else (25 if args.quick else 60)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"--out {args.out}: cannot create the report folder ({err.strerror})")
    started = time.perf_counter()
    splits = [data.imbalanced_digits(seed).to(device) for seed in range(seeds)]
    methods = training.METHODS
    # runs: seeds x methods (table) + methods (2-D pictures) + 2 (out of distribution)
    bar = tqdm(total=epochs * (len(methods) * (seeds + 1) + 2), unit="epoch", desc="training",
               file=sys.stderr)

    results: dict[str, list[dict[str, float]]] = {m.name: [] for m in methods}
    first_runs: dict[str, training.Trained] = {}
    for seed, split in enumerate(splits):
        for method in methods:
            bar.set_postfix_str(f"{method.name}, seed {seed}")
            trained = training.train(method, split, dim=args.dim, seed=seed, epochs=epochs,
                                     backend=args.backend, on_epoch=lambda: bar.update(1))
            results[method.name].append({
                **evaluation.scores(split.y_test, trained.predict(split.x_test)),
                **evaluation.retrieval_scores(trained, split.x_test, split.y_test, args.backend)})
            if seed == 0:
                first_runs[method.key] = trained
    figures = {}
    for method in methods:
        bar.set_postfix_str(f"{method.name}, 2-D")
        flat = training.train(method, splits[0], dim=2, seed=0, epochs=epochs,
                              backend=args.backend, on_epoch=lambda: bar.update(1))
        rep, conf = f"rep2d_{method.key}.png", f"confusion_{method.key}.png"
        report.figure_representation(flat, splits[0], out / rep)
        report.figure_confusion(first_runs[method.key], splits[0], out / conf)
        figures[method.name] = (rep, conf)
    bar.set_postfix_str("out of distribution")
    ood = evaluation.ood_auroc(splits[0], dim=args.dim, seed=0, epochs=epochs,
                               backend=args.backend)
    bar.update(2 * epochs)
    bar.close()
    similar = report.similar_labels_section(first_runs["ce"], splits[0], out)
    print("timing the kernels ...", file=sys.stderr)
    speeds = speed.speed_table(device, quick=args.quick)
    command = "python -m confusion_kernels demo " + " ".join(argv if argv is not None else sys.argv[2:])
    header = [f"- date: {datetime.date.today().isoformat()}, commit {_commit()}, "
              f"confusion-kernels {ck.__version__}",
              f"- command: `{command.strip()}`",
              f"- machine: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} CPU threads, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f", torch {torch.__version__}",
              f"- kernel backend: {ck.select_backend(splits[0].x_train, args.backend)}; "
              f"the demo ran in {time.perf_counter() - started:.0f} s (before writing the report)"]
    path = report.write_report(out, header=header, split=splits[0], results=results,
                               figures=figures, similar=similar, ood=ood, speed=speeds,
                               seeds=seeds, epochs=epochs, dim=args.dim)
    print(f"report: {path}")
    return path
