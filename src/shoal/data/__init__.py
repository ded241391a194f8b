"""Built-in data sets, loaders for a party's own files, and partitioners for simulations.

Everything here raises ``shoal.errors.DataError`` (a ``ValueError``) for bad data or
arguments, with a message that says what to change.
"""

from __future__ import annotations

from shoal.data.builtin import (
    DATASETS,
    load_breast_cancer,
    load_dataset,
    load_digits,
    load_iris,
    load_wine,
)
from shoal.data.dataset import Dataset
from shoal.data.files import load_csv, load_npz
from shoal.data.partition import (
    SCHEMES,
    LazyPartition,
    by_key_indices,
    dirichlet_indices,
    iid_indices,
    partition,
    quantity_skew_indices,
    shard_indices,
)
from shoal.data.spec import DataSpec
from shoal.data.split import split_holdout
from shoal.data.summary import PartitionSummary, summary
from shoal.data.text import (
    PAD,
    UNK,
    CharCorpus,
    RoleCorpus,
    load_play,
    load_shakespeare,
    parse_speeches,
    role_corpus,
    speech_list,
    split_roles,
    tokenize,
)

__all__ = [
    "DATASETS",
    "PAD",
    "SCHEMES",
    "UNK",
    "CharCorpus",
    "DataSpec",
    "Dataset",
    "LazyPartition",
    "PartitionSummary",
    "RoleCorpus",
    "by_key_indices",
    "dirichlet_indices",
    "iid_indices",
    "load_breast_cancer",
    "load_csv",
    "load_dataset",
    "load_digits",
    "load_iris",
    "load_npz",
    "load_play",
    "load_shakespeare",
    "load_wine",
    "parse_speeches",
    "partition",
    "quantity_skew_indices",
    "role_corpus",
    "shard_indices",
    "speech_list",
    "split_holdout",
    "split_roles",
    "summary",
    "tokenize",
]
