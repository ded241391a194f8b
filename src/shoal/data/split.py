"""Hold out part of one node's data for local evaluation, stratified by label when possible."""

from __future__ import annotations

import numpy as np

from shoal.data.dataset import Dataset
from shoal.errors import DataError

__all__ = ["split_holdout"]


def split_holdout(dataset: Dataset, *, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split into (train, holdout), the holdout holding about ``fraction`` of the samples.

    Both sides get at least one sample. Classification data are stratified when every class
    present has at least two samples and both sides can hold one of each; otherwise (small
    nodes) the split is plain random. Deterministic for a given ``seed``.
    """
    from sklearn.model_selection import train_test_split

    if not isinstance(dataset, Dataset):
        raise DataError(f"split_holdout needs a shoal Dataset, got {type(dataset).__name__}")
    if isinstance(fraction, bool) or not 0.0 < float(fraction) < 1.0:
        raise DataError(f"fraction must be strictly between 0 and 1, got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    n = len(dataset)
    if n < 2:
        raise DataError(
            f"dataset {dataset.name!r} has {n} sample(s); holding some out needs at least 2 "
            "(give the node more data or skip local evaluation)"
        )
    held = min(max(round(float(fraction) * n), 1), n - 1)
    stratify = None
    if dataset.classes is not None:
        counts = np.bincount(dataset.y)
        present = int((counts > 0).sum())
        if counts[counts > 0].min() >= 2 and present <= held and present <= n - held:
            stratify = dataset.y
    train_idx, hold_idx = train_test_split(
        np.arange(n), test_size=held, random_state=int(seed), stratify=stratify
    )
    return (
        dataset.subset(np.sort(train_idx)),
        dataset.subset(np.sort(hold_idx), name=f"{dataset.name}/holdout"),
    )
