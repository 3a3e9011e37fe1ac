"""ASLoss inside pytorch-metric-learning (PML) code: a miner, our loss through the PML adapter
(confusion_kernels.pml), PML's AccuracyCalculator to evaluate (faiss), on scikit-learn's
digits. Under a minute on 2 CPU cores.

    python examples/pml_digits.py [--epochs 30]

A PML user changes one line: ``loss_fn = pml.ASLoss(...)`` where ``losses.ContrastiveLoss()``
(or any PML loss) stood; the miner, the training loop and the evaluation stay as they are.
"""

from __future__ import annotations

import argparse

import torch
from pytorch_metric_learning import miners
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from confusion_kernels import pml


def embed_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 32))


def retrieval_scores(query, query_y, reference, reference_y) -> dict:
    """Precision@1 and MAP@R of the test embeddings against the training ones: PML's
    AccuracyCalculator (faiss), else precision@1 by exact nearest neighbour in torch."""
    try:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                                  k="max_bin_count")
        return calc.get_accuracy(query, query_y, reference, reference_y)
    except ImportError:  # no faiss
        nearest = torch.cdist(query, reference).argmin(1)
        return {"precision_at_1": (reference_y[nearest] == query_y).double().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=0,
                                              stratify=y)
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    y_tr, y_te = torch.tensor(y_tr), torch.tensor(y_te)

    model = embed_net()
    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    loss_fn = pml.ASLoss("euclidean", lambda_inner=1.0, lambda_outer=0.5, lambda_boundary=0.1,
                         constraint=5.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def scores() -> dict:
        with torch.no_grad():
            model.eval()
            out = retrieval_scores(model(x_te), y_te, model(x_tr), y_tr)
            model.train()
        return out

    print("before training:", {k: round(v, 3) for k, v in scores().items()})
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_tr))
        for batch in order.split(128):
            embeddings, labels = model(x_tr[batch]), y_tr[batch]
            loss = loss_fn(embeddings, labels, miner(embeddings, labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, mined pairs "
                  f"{miner.num_pos_pairs} positive / {miner.num_neg_pairs} negative")
    after = scores()
    print("after training: ", {k: round(v, 3) for k, v in after.items()})


if __name__ == "__main__":
    main()
