"""scikit-learn's handwritten digits (1797 8x8 images, shipped with scikit-learn, no download),
made imbalanced as in the Affinity-loss paper's protocol: a stratified train / test split, then
the training split keeps 10 % of the samples of digits 0-4 and all of digits 5-9; the test split
is left untouched."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_CLASSES = 10
MINORITY = (0, 1, 2, 3, 4)
KEEP_MINORITY = 0.10
TEST_FRACTION = 0.3


@dataclass
class DigitsSplit:
    x_train: torch.Tensor  # [n_train, 64] float32 in [0, 1]
    y_train: torch.Tensor  # [n_train] int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device | str) -> "DigitsSplit":
        return DigitsSplit(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test,
                                                    self.y_test)))

    def restricted_to(self, classes: int) -> "DigitsSplit":
        """Train and test rows of the labels below ``classes`` only."""
        keep_train, keep_test = self.y_train < classes, self.y_test < classes
        return DigitsSplit(self.x_train[keep_train], self.y_train[keep_train],
                           self.x_test[keep_test], self.y_test[keep_test])


def imbalanced_digits(seed: int) -> DigitsSplit:
    """The imbalanced split for one seed (the split and the subsampling both follow it)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION,
                                           random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    kept = []
    for c in range(NUM_CLASSES):
        members = idx_train[y[idx_train] == c]
        if c in MINORITY:
            members = rng.choice(members, size=max(1, round(KEEP_MINORITY * len(members))),
                                 replace=False)
        kept.append(members)
    idx_train = np.sort(np.concatenate(kept))
    return DigitsSplit(torch.from_numpy(x[idx_train]), torch.from_numpy(y[idx_train]),
                       torch.from_numpy(x[idx_test]), torch.from_numpy(y[idx_test]))
