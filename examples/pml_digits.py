"""Our losses inside pytorch-metric-learning (PML) code, on scikit-learn's digits: each method
trains the same small network through the PML adapter (confusion_kernels.pml) and is judged by
retrieval: MAP@R, precision@1 and recall@k of the test images against the training ones
(ck.retrieval_metrics; beside PML's AccuracyCalculator where faiss is installed, which gives
the same P@1 and MAP@R). About a minute on 2 CPU cores.

    python examples/pml_digits.py [--epochs 30] [--methods ASLoss SupConLoss ...]

A PML user changes one line: ``loss_fn = pml.ASLoss(...)`` where ``losses.ContrastiveLoss()``
(or any PML loss) stood; the miner, the training loop and the evaluation stay as they are.
"""

from __future__ import annotations

import argparse
import time

import torch
from pytorch_metric_learning import miners
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import confusion_kernels as ck
from confusion_kernels import pml

DIM = 32
# name: (the PML loss, whether a miner picks its pairs)
METHODS = {
    "ASLoss": (lambda: pml.ASLoss("euclidean", lambda_inner=1.0, lambda_outer=0.5,
                                  lambda_boundary=0.1, constraint=5.0), True),
    "NCentroidsLoss": (lambda: pml.NCentroidsLoss(10, DIM, metric="great_circle"), False),
    "ContrastiveLoss": (lambda: pml.ContrastiveLoss(), True),
    "SupConLoss": (lambda: pml.SupConLoss(temperature=0.1), False),
    "MultiSimilarityLoss": (lambda: pml.MultiSimilarityLoss(), True),
}
KS = (1, 5, 10)


def embed_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, DIM))


def retrieval_scores(query, query_y, reference, reference_y) -> dict:
    """Our streaming retrieval scores of the test embeddings against the training ones, and
    PML's AccuracyCalculator's P@1 and MAP@R beside them (when faiss is installed)."""
    ours = ck.retrieval_metrics(query, query_y, reference, reference_y, k=KS)
    out = {"MAP@R": ours["mean_average_precision_at_r"], "P@1": ours["precision_at_1"],
           **{f"R@{k}": ours[f"recall_at_{k}"] for k in KS if k > 1}}  # R@1 is P@1
    try:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                                  k="max_bin_count")
        theirs = calc.get_accuracy(query, query_y, reference, reference_y)
        out["PML MAP@R"] = theirs["mean_average_precision_at_r"]
    except ImportError:  # no faiss: our numbers alone
        pass
    return out


def train(name: str, data, epochs: int) -> tuple[dict, dict, float]:
    """(scores before, scores after, seconds) of one method."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(0)
    model = embed_net()
    make_loss, mined = METHODS[name]
    loss_fn = make_loss()
    miner = miners.MultiSimilarityMiner(epsilon=0.1) if mined else None
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-3)

    def scores() -> dict:
        with torch.no_grad():
            model.eval()
            out = retrieval_scores(model(x_te), y_te, model(x_tr), y_tr)
            model.train()
        return out

    before = scores()
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y_tr))
        for batch in order.split(128):
            embeddings, labels = model(x_tr[batch]), y_tr[batch]
            pairs = miner(embeddings, labels) if miner is not None else None
            loss = loss_fn(embeddings, labels, pairs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return before, scores(), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=0,
                                              stratify=y)
    data = (torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr),
            torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te))
    rows = []
    for name in args.methods:
        before, after, seconds = train(name, data, args.epochs)
        rows.append((name, before, after, seconds))
        print(f"{name}: MAP@R {before['MAP@R']:.3f} -> {after['MAP@R']:.3f} "
              f"({seconds:.1f} s)", flush=True)
    keys = list(rows[0][2])
    print(f"\nretrieval of the test digits among the training ones after {args.epochs} epochs "
          "(euclidean):\n")
    print("| method | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, _, after, _ in rows:
        print(f"| {name} | " + " | ".join(f"{after[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
