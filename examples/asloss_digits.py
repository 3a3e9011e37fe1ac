"""ASLoss on a real labelled batch: scikit-learn's handwritten digits (8x8
images, 10 classes, shipped with scikit-learn, no download).

Prints the ASLoss terms of the raw pixels and of a small embedding network
before and after a few training steps with 0.5 * cross-entropy + 0.5 * ASLoss
(the paper's recipe), and the backend that ran the fused kernel.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import confusion_kernels as ck


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--metric", default="euclidean")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64]
    y = torch.tensor(digits.target)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = x.to(device), y.to(device)

    print(f"digits: {x.shape[0]} images, {x.shape[1]} pixels, {int(y.max()) + 1} classes, device {device}")
    print(f"available backends: {ck.available_backends(x.device)}; "
          f"auto runs '{ck.select_backend(x, args.backend)}'")

    raw = ck.as_loss_terms(x, y, metric=args.metric, backend=args.backend)
    print(f"raw pixels      inner {raw.inner.item():8.4f}  outer {raw.outer.item():8.4f}  "
          f"boundary {raw.boundary.item():8.4f}")

    embed = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).to(device)
    classify = nn.Linear(16, 10).to(device)
    as_loss = ck.ASLoss(metric=args.metric, backend=args.backend)
    opt = torch.optim.Adam([*embed.parameters(), *classify.parameters()], lr=3e-3)
    train = torch.arange(x.shape[0], device=device) % 5 != 0  # 80% train, 20% test

    def report(tag: str) -> None:
        with torch.no_grad():
            z = embed(x)
            t = ck.as_loss_terms(z[~train], y[~train], metric=args.metric, backend=args.backend)
            acc = (classify(z[~train]).argmax(1) == y[~train]).float().mean().item()
        print(f"{tag:15} inner {t.inner.item():8.4f}  outer {t.outer.item():8.4f}  "
              f"boundary {t.boundary.item():8.4f}  test accuracy {acc:.3f}  (test split)")

    report("embedding init")
    for _ in range(args.steps):
        z = embed(x[train])
        loss = 0.5 * nn.functional.cross_entropy(classify(z), y[train]) + 0.5 * as_loss(z, y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    report(f"after {args.steps} steps")


if __name__ == "__main__":
    main()
