"""Load a party's own data from CSV or .npz files into a Dataset, with errors that say what to fix.

CSV goes through numpy's C parser first; only when that fails does a slower pass with the csv
module find the exact row and column at fault. .npz files are read with allow_pickle=False.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.data.dataset import MAX_CLASSES, Dataset
from shoal.errors import DataError

__all__ = ["load_csv", "load_npz"]

# Spellings of "no value" that spreadsheets and R/pandas exports write into CSV files.
_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "-"})


def load_csv(
    path: str | os.PathLike[str],
    *,
    label: str | int = "label",
    delimiter: str = ",",
    header: bool = True,
    classes: int | None = None,
    regression: bool = False,
    dtype: npt.DTypeLike = np.float32,
    name: str | None = None,
    categorical: Mapping[str, Sequence[str] | None] | None = None,
) -> Dataset:
    """Read a numeric CSV file: one column of labels, every other column a feature.

    ``label`` is the label column's header name or its index (negative counts from the end).
    Labels are integer class ids unless ``regression=True``; ``classes`` defaults to the
    largest label + 1 (pass it when this party does not see every class).

    ``categorical`` names columns whose fields are category labels (text): each becomes
    its category's index in the given list, or, for ``None``, in this file's own sorted
    labels. The Dataset's ``categories`` keeps each column's list (parties compare them).
    """
    p = Path(path)
    if not is_file(p, "CSV file"):
        what = "is not a regular file" if p.exists() else "not found"
        raise DataError(f"CSV file {what}: {str(p)!r}")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise DataError(f"delimiter must be one character, got {delimiter!r}")
    out_dtype = np.dtype(dtype)
    if out_dtype.kind != "f":
        raise DataError(f"dtype must be a float type (float32 or float64), got {out_dtype}")
    try:
        return _load_csv(
            p, label, delimiter, header, classes, regression, out_dtype, name, categorical or {}
        )
    except UnicodeDecodeError as exc:
        raise DataError(
            f"CSV file {str(p)!r} is not UTF-8 text (byte {exc.start} cannot be decoded): is "
            "it a CSV file? Save it as CSV UTF-8"
        ) from None
    except OSError as exc:  # a file that lists as regular but cannot be read (/proc, a bad disk)
        raise DataError(f"cannot read CSV file {str(p)!r}: {exc.strerror or exc}") from None
    except csv.Error as exc:  # e.g. a field past the csv module's limit of 131,072 characters
        raise DataError(
            f"CSV file {str(p)!r} cannot be parsed as CSV: {exc}; rows of numbers have no "
            "fields that long"
        ) from None


def is_file(p: Path, what: str) -> bool:
    """``p.is_file()``, with the errors pathlib raises rather than answers (a name too long
    for the file system, a folder that may not be searched) as a DataError."""
    try:
        return p.is_file()
    except OSError as exc:
        raise DataError(f"{what} {str(p)[:200]!r} cannot be opened: {exc.strerror}") from None


_MAX_HEADER_CHARS = 16 << 20  # the first line is read whole; a 1 GB line is not a header


def _load_csv(
    p: Path,
    label: str | int,
    delimiter: str,
    header: bool,
    classes: int | None,
    regression: bool,
    out_dtype: np.dtype[Any],
    name: str | None,
    categorical: Mapping[str, Sequence[str] | None],
) -> Dataset:
    # utf-8-sig drops the byte-order mark Excel writes at the start of "CSV UTF-8" files.
    with open(p, encoding="utf-8-sig", newline="") as f:
        first = f.readline(_MAX_HEADER_CHARS + 1)
        if len(first) > _MAX_HEADER_CHARS:
            raise DataError(
                f"CSV file {str(p)!r}: its first line is longer than {_MAX_HEADER_CHARS:,} "
                "characters; is it a CSV file of numbers with one row per line?"
            )
        if not first.strip():
            if not f.read().strip():
                raise DataError(f"CSV file {str(p)!r} is empty: it needs rows of numbers")
            raise DataError(
                f"CSV file {str(p)!r} starts with a blank line; remove it so the first line "
                "is the header (or the first data row with header=False)"
            )
        first_row = next(csv.reader([first], delimiter=delimiter))
        ncols = len(first_row)
        if header:
            columns = [c.strip() for c in first_row]
        else:
            columns = [f"column {j}" for j in range(ncols)]
            f.seek(0)
        label_col = _resolve_label(label, columns, header=header, path=p)
        texts = _categorical_columns(categorical, columns, label_col, header=header, path=p)
        data = None if texts else _fast_parse(f, delimiter=delimiter)
    if data is None or data.shape[1] != ncols or not np.isfinite(data).all():
        data = _slow_parse(p, delimiter, header, columns, label_col, regression, texts)
    categories = _encode_categories(data, texts, columns, categorical, p)
    if data.shape[0] == 0:
        raise DataError(
            f"CSV file {str(p)!r} has a header but no data rows; add one row per sample"
        )
    if ncols < 2:
        raise DataError(
            f"CSV file {str(p)!r} has only the label column; it needs at least one feature column"
        )
    labels = data[:, label_col]
    x = np.delete(data, label_col, axis=1).astype(out_dtype)
    names = tuple(c for j, c in enumerate(columns) if j != label_col) if header else None
    ds_name = name if name is not None else p.stem or "csv"
    if regression:
        return Dataset(
            x=x, y=labels, classes=None, feature_names=names, name=ds_name, categories=categories
        )
    if (labels != np.round(labels)).any() or (labels < 0).any():
        # The slow pass names the first offending row and says how to fix it.
        _slow_parse(p, delimiter, header, columns, label_col, regression, {j: [] for j in texts})
    _check_top_label(float(labels.max()) if labels.size else 0.0, f"CSV file {str(p)!r}")
    y = labels.astype(np.int64)  # safe: integers in [0, MAX_CLASSES)
    return Dataset(
        x=x,
        y=y,
        classes=_infer_classes(y, classes, where=f"CSV file {str(p)!r}"),
        feature_names=names,
        name=ds_name,
        categories=categories,
    )


def _categorical_columns(
    categorical: Mapping[str, Sequence[str] | None],
    columns: list[str],
    label_col: int,
    *,
    header: bool,
    path: Path,
) -> dict[int, list[str]]:
    """Column index -> an empty list to collect its labels in, for each categorical column."""
    out: dict[int, list[str]] = {}
    for column, labels in categorical.items():
        if not header:
            raise DataError("categorical columns are named by the header; the file has none")
        if column not in columns or columns.index(column) == label_col:
            raise DataError(
                f"categorical column {column!r} is not a feature column of {str(path)!r}"
            )
        if labels is not None and (
            isinstance(labels, str)
            or not all(isinstance(c, str) for c in labels)
            or len(set(labels)) != len(labels)
            or not labels
        ):
            raise DataError(
                f"the categories of column {column!r} must be a list of distinct strings, "
                f"got {labels!r}"
            )
        out[columns.index(column)] = []
    return out


def _encode_categories(
    data: np.ndarray,
    texts: dict[int, list[str]],
    columns: list[str],
    categorical: Mapping[str, Sequence[str] | None],
    path: Path,
) -> dict[str, tuple[str, ...]] | None:
    """Write each categorical column's codes into ``data``; its categories, by name."""
    if not texts:
        return None
    out: dict[str, tuple[str, ...]] = {}
    for j, values in texts.items():
        declared = categorical[columns[j]]
        labels = tuple(declared) if declared is not None else tuple(sorted(set(values)))
        code = {c: i for i, c in enumerate(labels)}
        unknown = next((v for v in values if v not in code), None)
        if unknown is not None:
            raise DataError(
                f"CSV file {str(path)!r}: column {columns[j]!r} holds {unknown!r}, which is not "
                f"one of its declared categories {list(labels)[:20]}; add it to the list"
            )
        data[:, j] = [code[v] for v in values]
        out[columns[j]] = labels
    return out


def _resolve_label(label: str | int, columns: list[str], *, header: bool, path: Path) -> int:
    ncols = len(columns)
    if isinstance(label, str):
        if not header:
            raise DataError(
                f"label={label!r} names a column but header=False, so {str(path)!r} has no "
                "column names; pass the label column's index instead (label=0, label=-1, ...)"
            )
        if label not in columns:
            shown = ", ".join(repr(c) for c in columns[:30])
            more = f", ... ({ncols} columns)" if ncols > 30 else ""
            raise DataError(
                f"CSV file {str(path)!r} has no label column {label!r}; its columns are "
                f"{shown}{more}: pass label=<column name or index>"
            )
        if columns.count(label) > 1:
            # the first copy would be taken silently while the others became features
            raise DataError(
                f"CSV file {str(path)!r} has {columns.count(label)} columns named {label!r}; "
                "rename all but the label column, or pass the label column's index"
            )
        return columns.index(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise DataError(f"label must be a column name or an integer index, got {label!r}")
    if not -ncols <= label < ncols:
        raise DataError(
            f"label column index {label} is out of range: {str(path)!r} has {ncols} columns "
            f"(valid indices {-ncols}..{ncols - 1})"
        )
    return int(label) % ncols


def _fast_parse(f: io.TextIOBase, *, delimiter: str) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            # An empty body is reported by our own checks, not as numpy's UserWarning.
            warnings.simplefilter("ignore", UserWarning)
            return np.loadtxt(
                f,
                delimiter=delimiter,
                dtype=np.float64,
                ndmin=2,
                comments=None,
                quotechar='"',
            )
    except ValueError:
        return None


def _slow_parse(
    path: Path,
    delimiter: str,
    header: bool,
    columns: list[str],
    label_col: int,
    regression: bool,
    texts: dict[int, list[str]] | None = None,
) -> np.ndarray:
    """Parse row by row; raise a DataError naming the first bad row and column. Fields of
    the columns in ``texts`` are kept there as text (the array holds 0 for them)."""
    texts = texts or {}
    ncols = len(columns)
    rows: list[list[float]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        if header:
            next(reader, None)
        for raw in reader:
            if not raw or (len(raw) == 1 and not raw[0].strip()):
                continue
            where = f"row {len(rows) + 1} (line {reader.line_num} of {str(path)!r})"
            if len(raw) != ncols:
                raise DataError(
                    f"{where} has {len(raw)} fields but the file has {ncols} columns; every "
                    "row needs exactly one value per column (check for stray delimiters)"
                )
            values: list[float] = []
            for j, field in enumerate(raw):
                if j in texts:
                    texts[j].append(_category_field(field.strip(), where, columns[j]))
                    values.append(0.0)
                    continue
                values.append(
                    _parse_field(field.strip(), j == label_col, regression, where, columns[j])
                )
            rows.append(values)
    data = np.array(rows, dtype=np.float64).reshape(len(rows), ncols)
    return data


def _category_field(text: str, where: str, column: str) -> str:
    if not text:
        raise DataError(f"{where} has no category in column {column!r}; fill it in or drop the row")
    return text


def _parse_field(text: str, is_label: bool, regression: bool, where: str, column: str) -> float:
    if is_label:
        if text.lower() in _MISSING:
            raise DataError(
                f"{where} has no label (found {text!r} in label column {column!r}); "
                "drop the unlabeled row or fill in its label"
            )
        try:
            value = float(text)
        except ValueError:
            fix = (
                "regression targets must be numbers"
                if regression
                else "classification labels must be integer class ids 0..K-1: map class "
                f"names such as {text!r} to integers first"
            )
            raise DataError(f"{where}: label {text!r} is not a number; {fix}") from None
        if not np.isfinite(value):
            raise DataError(f"{where}: label {text!r} is not finite; fix or drop the row")
        if not regression and value != round(value):
            raise DataError(
                f"{where}: label {text!r} is not an integer; classification labels must be "
                "integer class ids (load with regression=True for a numeric target)"
            )
        if not regression and value < 0:
            raise DataError(f"{where}: label {text!r} is negative; class ids must be 0..K-1")
        return value
    if text.lower() in _MISSING:
        raise DataError(
            f"{where} has a missing value in column {column!r} (found {text!r}); fill it in "
            "(impute) or drop the row before loading"
        )
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{where}: column {column!r} holds {text!r}, which is not a number; shoal reads "
            "numeric features only: encode categorical columns as numbers (e.g. one-hot), "
            "name them in categorical= (trees: [model] categorical), or drop them"
        ) from None
    if not np.isfinite(value):
        raise DataError(
            f"{where}: column {column!r} holds {text!r}; features must be finite: "
            "replace it or drop the row"
        )
    return value


def _check_top_label(top: float, where: str) -> None:
    """Refuse a label that would size per-class arrays past MAX_CLASSES, before any is made."""
    if top >= MAX_CLASSES:
        shown = f"{top:.0f}" if top < 1e18 else f"{top:g}"
        raise DataError(
            f"{where} has label {shown}, which would mean more than {MAX_CLASSES} classes (the "
            "most supported): class labels must be dense ids 0..K-1; map sparse or hashed "
            "labels to 0..K-1 first"
        )


def _infer_classes(y: np.ndarray, classes: int | None, *, where: str) -> int:
    if y.size == 0:
        raise DataError(f"{where} holds no samples")
    top = int(y.max())
    _check_top_label(top, where)
    if classes is None:
        return top + 1
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 1:
        raise DataError(f"classes must be a positive integer, got {classes!r}")
    if top >= classes:
        raise DataError(
            f"{where} has label {top} but classes={classes}; labels must lie in "
            f"0..{classes - 1} (raise classes or fix the labels)"
        )
    return int(classes)


def load_npz(
    path: str | os.PathLike[str],
    *,
    x: str = "x",
    y: str = "y",
    classes: int | None = None,
    regression: bool = False,
    name: str | None = None,
) -> Dataset:
    """Read features and labels from the arrays named ``x`` and ``y`` of an .npz archive.

    Loaded with ``allow_pickle=False`` always: an archive holding object arrays (which are
    stored as pickles and can run code when loaded) is refused.
    """
    p = Path(path)
    if not is_file(p, ".npz file"):
        raise DataError(f".npz file not found: {str(p)!r}")
    where = f".npz file {str(p)!r}"
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x80"):
        raise DataError(
            f"{where} is a pickle, not an .npz archive; pickled data is refused because "
            "unpickling can run arbitrary code: save plain arrays with np.savez"
        )
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        raise DataError(
            f"{where} is not an .npz archive (a zip of arrays written by np.savez); for CSV "
            "files use load_csv"
        )
    if magic.startswith(b"\x93NUMPY"):  # np.load would read it whole first (any size it says)
        raise DataError(
            f"{where} holds a single array, not an .npz archive; save features and labels "
            f"together with np.savez(path, {x}=features, {y}=labels)"
        )
    try:
        archive: Any = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{where} holds an object array; object arrays are refused because they hold "
                "pickles, which can run arbitrary code when loaded: save plain numeric arrays"
            ) from exc
        raise DataError(f"{where} cannot be read as an .npz archive ({exc})") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{where} cannot be read as an .npz archive ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{where} holds a single array, not an .npz archive; save features and labels "
            f"together with np.savez(path, {x}=features, {y}=labels)"
        )
    with archive:
        keys = list(archive.files)
        for key, role in ((x, "features"), (y, "labels")):
            if key not in keys:
                raise DataError(
                    f"{where} has no array {key!r} for the {role}; it holds "
                    f"{', '.join(repr(k) for k in keys) or 'no arrays'}: pass "
                    f"{'x' if role == 'features' else 'y'}=<array name>"
                )
        features = _read_member(archive, x, where)
        labels = _read_member(archive, y, where)
    ds_name = name if name is not None else p.stem or "npz"
    if regression:
        return Dataset(x=features, y=labels, classes=None, name=ds_name)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.flatnonzero(bad.ravel())[0])
            raise DataError(
                f"{where}: label {y}[{i}] = {labels.ravel()[i]} is not an integer; "
                "classification labels must be integer class ids (load with "
                "regression=True for a numeric target)"
            )
    elif labels.dtype.kind not in "iub":
        raise DataError(
            f"{where}: labels {y!r} have dtype {labels.dtype}; classification labels must be "
            "integer class ids 0..K-1 (map class names to integers first)"
        )
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: labels must be class ids 0..K-1, found {labels.min()}")
    if labels.size:
        _check_top_label(float(labels.max()), where)
    ints = labels.astype(np.int64)
    return Dataset(
        x=features,
        y=ints,
        classes=_infer_classes(ints, classes, where=where),
        name=ds_name,
    )


def _declared_bytes(archive: Any, key: str) -> tuple[int, int] | None:
    """(bytes the member's .npy header declares, bytes the member holds), or None when it
    is not an .npy member (np.load says why)."""
    names = set(archive.zip.namelist())
    name = key + ".npy" if key + ".npy" in names else key
    if name not in names:
        return None
    info = archive.zip.getinfo(name)
    fmt = np.lib.format
    try:
        with archive.zip.open(name) as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            header = f.tell()
    except ValueError:  # not an .npy header numpy reads so (3.0: UTF-8): np.load says why
        return None
    count = 1
    for d in shape:
        count *= d
    return count * dtype.itemsize, info.file_size - header


def _read_member(archive: Any, key: str, where: str) -> np.ndarray:
    try:
        # np.load allocates the whole declared array before it reads a byte: a 200-byte
        # member declaring 4 TiB raised MemoryError (a traceback from `shoal run`)
        sizes = _declared_bytes(archive, key)
        if sizes is not None and sizes[0] > sizes[1]:
            raise DataError(
                f"{where}: array {key!r} declares {sizes[0]:,} bytes of data but its member "
                f"holds {sizes[1]:,}: the file is damaged or not written by np.save"
            )
        arr: np.ndarray = archive[key]
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise DataError(
                f"{where}: array {key!r} is an object array; object arrays are refused because "
                "they hold pickles, which can run arbitrary code when loaded. Save plain "
                "numeric arrays (e.g. np.asarray(values, dtype=np.float32)) instead"
            ) from exc
        raise DataError(f"{where}: array {key!r} cannot be read ({exc})") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{where}: array {key!r} cannot be read ({exc})") from exc
    except MemoryError:
        raise DataError(f"{where}: array {key!r} does not fit in memory") from None
    return arr
