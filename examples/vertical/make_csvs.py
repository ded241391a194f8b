"""Write bank.csv (guest: 10 columns + label) and insurer.csv (host: 20 columns) from
scikit-learn's breast_cancer, each with a shuffled 90% overlap of ids.

    python examples/vertical/make_csvs.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer


def main(out: Path = Path(__file__).parent, seed: int = 0) -> None:
    data = load_breast_cancer()
    x, y = data.data, data.target
    names = [n.replace(" ", "_") for n in data.feature_names]
    rng = np.random.default_rng(seed)
    n = len(y)
    ids = rng.permutation(np.arange(100000, 100000 + n))
    shared = rng.permutation(n)[: int(0.9 * n)]
    rest = np.setdiff1d(np.arange(n), shared)
    bank_rows = rng.permutation(np.concatenate([shared, rest[: len(rest) // 2]]))
    insurer_rows = rng.permutation(np.concatenate([shared, rest[len(rest) // 2 :]]))
    with (out / "bank.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "default", *names[:10]])
        for r in bank_rows:
            w.writerow([ids[r], int(y[r]), *(f"{v:.6g}" for v in x[r, :10])])
    with (out / "insurer.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *names[10:]])
        for r in insurer_rows:
            w.writerow([ids[r], *(f"{v:.6g}" for v in x[r, 10:])])


if __name__ == "__main__":
    main()
