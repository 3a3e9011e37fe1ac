"""Out-of-distribution scoring with the N-Centroids loss and a von Mises-Fisher confidence head,
on scikit-learn's handwritten digits (8x8 images, shipped with scikit-learn, no download).

Digits 0-7 are the known classes (75 % to train, 25 % held out); every 8 and 9 is an
out-of-distribution input the networks never see. Two networks of the same shape, trained
the same way (Adam, same epochs, batches and seed):
  * NCL: a unit embedding trained with NCentroidsLoss (great-circle metric, EMA centroids) plus
    the vMF negative log-likelihood of the embedding under its class centroid, with a
    concentration kappa that a second head predicts;
  * CE: a linear classifier trained with cross-entropy (the max-softmax baseline).
It prints the held-out accuracy of both and the AUROC of telling held-out 0-7 from 8-9
(sklearn.metrics.roc_auc_score, in-distribution = positive) for each confidence score:
max softmax (CE); and for NCL the distance to the nearest centroid, kappa, and the vMF
log-likelihood under the nearest centroid (NCentroidsLoss.confidence).

The centroids' EMA rate is alpha0 = 0.01 here, not the default 0.25: from an untrained network
every class's mean embedding points the same way, and at 0.25 per step the centroids follow
those means together before the network has separated the classes; they collapse and the
nearest-centroid accuracy stays near chance (--alpha0 0.25 shows it).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

import confusion_kernels as ck

KNOWN = 8  # classes 0..7


class Net(nn.Module):
    def __init__(self, out: int, with_kappa: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, out)
        self.kappa = nn.Linear(64, 1) if with_kappa else None

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        kappa = F.softplus(self.kappa(h))[:, 0] + 1e-2 if self.kappa is not None else None
        return self.head(h), kappa


def batches(n: int, size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + size] for i in range(0, n, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--dim", type=int, default=16, help="embedding dimension of the NCL net")
    parser.add_argument("--vmf-weight", type=float, default=0.1)
    parser.add_argument("--alpha0", type=float, default=0.01,
                        help="EMA rate of the centroids (see the module docstring)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(digits.target)
    known = y_all < KNOWN
    idx_train, idx_test = train_test_split(known.nonzero()[:, 0].numpy(), test_size=0.25,
                                           random_state=args.seed, stratify=y_all[known].numpy())
    x_train, y_train = x_all[idx_train], y_all[idx_train]
    x_test, y_test = x_all[idx_test], y_all[idx_test]
    x_ood = x_all[~known]
    print(f"digits: train {len(x_train)} (0-7), held-out {len(x_test)} (0-7), "
          f"out of distribution {len(x_ood)} (8-9)")

    torch.manual_seed(args.seed)
    ncl_net, ce_net = Net(args.dim, with_kappa=True), Net(KNOWN, with_kappa=False)
    ncl = ck.NCentroidsLoss(KNOWN, args.dim, metric="great_circle", alpha0=args.alpha0,
                            seed=args.seed)
    opt_ncl = torch.optim.Adam(ncl_net.parameters(), lr=1e-3)
    opt_ce = torch.optim.Adam(ce_net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for b in batches(len(x_train), 128, g):
            xb, yb = x_train[b], y_train[b]
            z, kappa = ncl_net(xb)
            centroids = ncl.centroids.clone()  # the vMF term uses the centroids before the EMA step
            loss = ncl(z, yb) + args.vmf_weight * ck.vmf_nll(
                F.normalize(z, dim=1), centroids[yb], kappa).mean()
            opt_ncl.zero_grad()
            loss.backward()
            opt_ncl.step()
            logits, _ = ce_net(xb)
            ce = F.cross_entropy(logits, yb)
            opt_ce.zero_grad()
            ce.backward()
            opt_ce.step()
        if epoch % 20 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}  NCL+vMF loss {loss.item():8.4f}  CE loss {ce.item():.4f}")

    ncl_net.eval(), ce_net.eval(), ncl.eval()
    with torch.no_grad():
        inside = torch.cat([torch.ones(len(x_test)), torch.zeros(len(x_ood))]).numpy()
        x_eval = torch.cat([x_test, x_ood])
        z, kappa = ncl_net(x_eval)
        conf = ncl.confidence(z, kappa=kappa)
        logits, _ = ce_net(x_eval)
        softmax = logits.softmax(1)
        n_test = len(x_test)
        acc_ncl = (conf.prediction[:n_test] == y_test).float().mean().item()
        acc_ce = (softmax[:n_test].argmax(1) == y_test).float().mean().item()
        scores = {
            "CE: max softmax (baseline)": softmax.max(1).values,
            "NCL: -distance to the nearest centroid": -conf.distance,
            "NCL: kappa (vMF head)": conf.head,
            "NCL: vMF log-likelihood, nearest centroid": conf.log_likelihood,
        }
    print(f"held-out accuracy on 0-7: NCL (nearest centroid) {acc_ncl:.3f}, CE {acc_ce:.3f}")
    print("AUROC, held-out 0-7 against 8-9 (higher is better):")
    for name, score in scores.items():
        print(f"  {name:45s} {roc_auc_score(inside, score.numpy()):.3f}")


if __name__ == "__main__":
    main()
