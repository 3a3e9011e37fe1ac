"""Benchmark inputs: random rows, or clustered rows shaped like a trained embedding.

  random     x ~ N(0, 1) per entry
  clustered  one centre per class at radius 10 (a random direction), each row its
             class's centre + N(0, 0.3^2) per dimension: tight classes far from
             the origin, where a plain Gram form loses its digits
Labels are uniform over ``classes``.
"""

DATA_KINDS = ("random", "clustered")


def make_data(n: int, d: int, data: str, *, classes: int = 10, seed: int = 0):
    """(x [N, D] float32 on the CPU, labels [N] int64)."""
    import torch

    if data not in DATA_KINDS:
        raise ValueError(f"unknown data {data!r}; expected one of {DATA_KINDS}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    if data == "random":
        return torch.randn(n, d, generator=g), labels
    centres = torch.randn(classes, d, generator=g)
    centres = 10.0 * centres / centres.norm(dim=1, keepdim=True)
    return centres[labels] + 0.3 * torch.randn(n, d, generator=g), labels
