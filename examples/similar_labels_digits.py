"""Which digits does a small CNN confuse, and do its internal representations
say so? scikit-learn's 8x8 digits (no download), a two-layer CNN trained for a
few epochs with cross-entropy + the affinity loss, then:

  * the GAP features of every Conv2d (GAPRecorder) streamed into per-class
    statistics (ClassStatistics), Welch's t-test and the top-2 similar labels;
  * the test confusion matrix (scikit-learn) and its most confused pairs,
    and how many of them the similar labels predicted;
  * figures: the 2-D embedding with the affinity prototypes, the confusion
    matrix and the similar-labels table (written to --out).
"""

from __future__ import annotations

import argparse
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

import confusion_kernels as ck
from confusion_kernels import analysis


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.embed = nn.Linear(32, 2)  # a 2-D embedding, to be plotted
        self.classify = nn.Linear(2, 10)

    def forward(self, x):
        z = self.embed(self.features(x).mean((2, 3)))
        return z, self.classify(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="similar_labels_out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y))
    train, test = perm[:1300], perm[1300:]

    model = DigitNet()
    affinity = ck.AffinityLoss(10, 2, num_centers=1, sigma=1.0, margin=0.5, lambda_diversity=0.0)
    opt = torch.optim.Adam(list(model.parameters()) + list(affinity.parameters()), lr=1e-2)
    for epoch in range(args.epochs):
        for batch in train.split(128):
            z, logits = model(x[batch])
            loss = nn.functional.cross_entropy(logits, y[batch]) + affinity(z, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        z_train, _ = model(x[train])
        z_test, logits = model(x[test])
    pred = logits.argmax(1)
    print(f"test accuracy {(pred == y[test]).float().mean():.3f} "
          f"(affinity predict: {(affinity.predict(z_test) == y[test]).float().mean():.3f})")

    # internal representations -> similar labels
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[train], y[train]), batch_size=256)
    stats, names = analysis.collect_statistics(model, loader, 10)
    print(f"{stats.num_features} GAP features from layers {sorted({n for n, _ in names})}")
    idx, scores = ck.similar_labels(stats, k=2)
    for c in range(10):
        print(f"  digit {c}: most similar {idx[c].tolist()} (cos {[round(s, 2) for s in scores[c].tolist()]})")

    # the confusion it predicts
    conf = analysis.confusion_matrix(y[test], pred, 10)
    print("most confused (true, predicted, count):", analysis.most_confused_pairs(conf, 5))
    cmp = analysis.similar_vs_confused(idx, conf, k=5)
    print(f"top-5 similar pairs among the top-5 confused pairs: {cmp['overlap']} of 5")

    analysis.plot_representation((z_train, y[train]), (z_test, y[test]), prototypes=affinity.prototypes,
                                 path=os.path.join(args.out, "representation.png"))
    analysis.plot_confusion_matrix(conf, path=os.path.join(args.out, "confusion.png"))
    analysis.plot_similar_labels(idx, scores, path=os.path.join(args.out, "similar_labels.png"))
    print(f"figures in {args.out}/")


if __name__ == "__main__":
    main()
