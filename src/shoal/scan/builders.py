"""shoal's own builders for the values a model file may hold: dtypes, arrays and scalars.

Each takes plain, already-decoded arguments (strings, ints, tuples, bytes), checks every one of
them and refuses anything else with ``UnsafeModelError``; none is ever handed an object the
file constructed. The loader (``unpickle``) and the scanner's joblib reading share them, so both
agree on how many bytes an array occupies.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from shoal.errors import UnsafeModelError
from shoal.scan.brief import brief

__all__ = [
    "DtypeLayoutError",
    "build_array",
    "build_dtype",
    "build_object_array",
    "build_scalar",
    "check_shape",
    "empty_bytes",
    "literal_dtype_state",
]

# A plain type code as numpy pickles it: no brackets, no commas, no field lists.
_CODE = re.compile(r"[<>|=]?[biufcSUVMmO?][0-9]{0,6}")
_KINDS = frozenset("biufcSUVMmO?")
_BYTEORDERS = frozenset("<>|=")
_SWAPPED = ">" if sys.byteorder == "little" else "<"


def empty_bytes(n: int) -> Any:
    """An uninitialised writable byte buffer for raw array data (no zero-fill, unlike
    ``bytearray(n)``: the bytes read into it are the only ones ever written)."""
    import numpy as np

    return np.empty(n, dtype=np.uint8)


def _refuse(what: str) -> UnsafeModelError:
    return UnsafeModelError(f"refusing {what}")


class DtypeLayoutError(UnsafeModelError):
    """A dtype state NumPy's ``__setstate__`` accepts but whose flags, field offsets or element
    size disagree with the layout it describes: arrays of it reach memory they do not own."""


def literal_dtype_state(state: Any) -> bool:
    """True when ``state`` is a dtype pickle state of plain literals shoal accepts.

    ``(version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])``
    where a subarray is ``(dtype, shape)``, fields map names to ``(dtype, offset)`` with every
    dtype one shoal built already, and metadata (datetimes only) is
    ``(None, (unit bytes, int, int, int))``.
    """
    import numpy as np

    if not isinstance(state, tuple) or len(state) not in (8, 9):
        return False
    version, order, sub, names, fields, elsize, align, flags = state[:8]
    if type(version) is not int or version not in (3, 4):
        return False
    if type(order) is not str or order not in _BYTEORDERS:
        return False
    if sub is not None and not (
        type(sub) is tuple
        and len(sub) == 2
        and isinstance(sub[0], np.dtype)
        and type(sub[1]) is tuple
        and all(type(d) is int and 0 <= d < 1 << 31 for d in sub[1])
    ):
        return False
    if (names is None) != (fields is None):
        return False
    if names is not None:
        # a structured dtype: field names, and fields of dtypes shoal already built
        if type(names) is not tuple or type(fields) is not dict or set(names) != set(fields):
            return False
        if len(names) > 4096 or not all(type(n) is str for n in names):
            return False
        for spec in fields.values():
            if not (type(spec) is tuple and len(spec) in (2, 3) and isinstance(spec[0], np.dtype)):
                return False
            if type(spec[1]) is not int or spec[1] < 0 or (len(spec) == 3 and spec[2] is not None):
                if len(spec) == 3 and type(spec[2]) is str:
                    continue
                return False
    if not all(type(x) is int for x in (elsize, align, flags)):
        return False
    if not (-1 <= elsize <= 1 << 24 and -1 <= align <= 64 and 0 <= flags <= 1 << 16):
        return False
    if len(state) == 9:
        meta = state[8]
        if meta is None:
            return True
        if not (isinstance(meta, tuple) and len(meta) == 2 and meta[0] is None):
            return False
        info = meta[1]
        return (
            isinstance(info, tuple)
            and len(info) == 4
            and type(info[0]) is bytes
            and re.fullmatch(rb"[a-zA-Z]{1,8}", info[0]) is not None
            and all(type(x) is int and 0 <= x < 1 << 31 for x in info[1:])
        )
    return True


def build_dtype(code: Any, state: Any = None) -> Any:
    """A NumPy dtype from the code and (optional) state a pickle gives ``numpy.dtype``.

    The state is checked to be plain literals before NumPy's own ``__setstate__`` sees it, so the
    resulting itemsize is exactly the one ``pickle.load`` would produce.
    """
    import numpy as np

    if type(code) is not str or not _CODE.fullmatch(code):
        raise _refuse(
            f"dtype {brief(code)}: only plain numeric, bool, string and datetime types load"
        )
    try:
        dtype = np.dtype(code)
    except (TypeError, ValueError):  # e.g. 'f14': the pattern allows sizes NumPy does not
        raise _refuse(f"dtype {brief(code)}: NumPy has no such type") from None
    if state is not None:
        if not literal_dtype_state(state):
            raise _refuse("a dtype state that is not plain literals (structured dtypes refused)")
        # NumPy's __setstate__ builds whatever descriptor the state says, and two kinds crash
        # NumPy itself (SIGSEGV): a swapped byte order on an object type, and a datetime
        # without its unit metadata. NumPy's own pickles write neither.
        if dtype.kind == "O" and state[1] == _SWAPPED:
            raise DtypeLayoutError(f"refusing a byte-swapped object dtype state: {brief(state)}")
        if dtype.kind in "Mm" and len(state) != 9:
            raise DtypeLayoutError(
                f"refusing a datetime dtype state without its unit metadata: {brief(state)}"
            )
        # copy=True, as numpy's own pickles ask: __setstate__ mutates the object, and the plain
        # np.dtype(code) is NumPy's shared descriptor for that type
        dtype = np.dtype(code, align=False, copy=True)
        try:
            dtype.__setstate__(state)  # type: ignore[attr-defined]
        except (TypeError, ValueError) as exc:
            raise _refuse(f"dtype state {brief(state)}: {exc}") from None
        _check_nesting(dtype)
        # __setstate__ trusts the state's flags, element size and field offsets: a state can
        # clear the has-object flag of an object dtype (raw bytes read as pointers) or place a
        # field, or a subarray, past the element (views of memory the array does not own).
        # Rebuild the dtype through NumPy's validating constructor and keep that one.
        dtype = _canonical(dtype)
    if dtype.kind not in _KINDS or (dtype.itemsize <= 0 and dtype.kind not in "SUV"):
        raise _refuse(f"dtype {dtype}")
    return dtype


# Structured dtypes nested in one another: NumPy's repr and str of a dtype recurse about three
# Python frames a level (400 levels raised RecursionError), and a file adds a level in ~50 bytes.
_DTYPE_DEPTH = 100


def _check_nesting(dtype: Any) -> None:
    """Refuse a dtype whose fields and subarrays nest more than ``_DTYPE_DEPTH`` deep, walked
    without recursion; a dtype that several fields share is walked once."""
    heights: dict[int, int] = {}
    keep = []  # the dtypes walked stay alive, so their ids are not reused during the walk
    todo: list[tuple[Any, bool]] = [(dtype, False)]
    while todo:
        d, children_done = todo.pop()
        if id(d) in heights and not children_done:
            continue
        subs = _sub_dtypes(d)
        if children_done:
            heights[id(d)] = 1 + max((heights[id(c)] for c in subs), default=0)
            if heights[id(d)] > _DTYPE_DEPTH:
                raise _refuse(
                    f"a structured dtype nested more than {_DTYPE_DEPTH} deep (NumPy's repr of "
                    "it recurses past Python's limit)"
                )
            continue
        keep.append(d)
        todo.append((d, True))
        todo.extend((c, False) for c in subs if id(c) not in heights)


def _sub_dtypes(dtype: Any) -> list[Any]:
    if dtype.subdtype is not None:
        return [dtype.subdtype[0]]
    if dtype.names is not None:
        return [dtype.fields[n][0] for n in dtype.names]
    return []


def _show(dtype: Any) -> str:
    """A dtype's repr, except a structured one's (it spells out every nested field)."""
    if dtype.names is None and dtype.subdtype is None:
        return repr(dtype)
    return f"<structured {dtype.str}, {len(dtype.names or ())} fields>"


def _canonical(dtype: Any, done: dict[int, Any] | None = None) -> Any:
    """``dtype`` rebuilt by NumPy's own constructor (which checks layout and computes the
    flags itself), refused unless the rebuilt one has the same layout.

    Each field dtype object is rebuilt once (``done``): fields share dtypes, so a dtype of two
    fields of one dtype of two fields ... is a few bytes per level and 2**levels fields when
    walked as a tree."""
    import numpy as np

    if done is None:
        done = {}
    hit = done.get(id(dtype))
    if hit is not None and hit[0] is dtype:
        return hit[1]
    try:
        if dtype.subdtype is not None:
            base, shape = dtype.subdtype
            new = np.dtype((_canonical(base, done), shape))
        elif dtype.names is not None:
            fields = dtype.fields
            names = list(dtype.names)
            new = np.dtype(
                {
                    "names": names,
                    "formats": [_canonical(fields[n][0], done) for n in names],
                    "offsets": [fields[n][1] for n in names],
                    "titles": [fields[n][2] if len(fields[n]) == 3 else None for n in names],
                    "itemsize": dtype.itemsize,
                }
            )
        else:
            new = np.dtype(dtype.str)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DtypeLayoutError(
            f"refusing dtype {_show(dtype)}: its state describes an invalid layout "
            f"({str(exc)[:200]})"
        ) from None
    # has-object is the one flag that decides whether raw bytes are read as object pointers
    if new != dtype or new.itemsize != dtype.itemsize or new.hasobject != dtype.hasobject:
        raise DtypeLayoutError(
            f"refusing dtype {brief(dtype.str)}: its state disagrees with its layout"
        )
    done[id(dtype)] = (dtype, new)  # the object is kept alive, so its id is not reused
    return new


def check_shape(shape: Any, *, max_dims: int = 64) -> tuple[int, ...]:
    """A shape of non-negative Python ints (bools refused), as a tuple."""
    if not isinstance(shape, (tuple, list)) or len(shape) > max_dims:
        raise _refuse(f"array shape {brief(shape)}: expected a tuple of at most {max_dims} ints")
    if not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
        raise _refuse(f"array shape {brief(shape)}: dimensions must be non-negative ints")
    return tuple(shape)


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_array(data: Any, dtype: Any, shape: Any, *, fortran: bool = False) -> Any:
    """A writable array of ``shape`` and ``dtype`` from exactly the bytes it needs."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _refuse("an array whose dtype is not a plain dtype shoal built")
    shape = check_shape(shape)
    if type(fortran) is not bool:
        raise _refuse(f"array order flag {brief(fortran)}")
    if isinstance(data, np.ndarray):  # raw bytes shoal read into a uint8 buffer itself
        if data.dtype != np.uint8 or data.ndim != 1 or not data.flags.writeable:
            raise _refuse("array data that is not a flat writable byte buffer")
        size = data.nbytes
    elif isinstance(data, (bytes, bytearray)):
        size = len(data)
    else:
        raise _refuse(f"array data of type {type(data).__name__}: expected raw bytes")
    count = _count(shape)
    if count * dtype.itemsize != size:
        raise _refuse(
            f"array of shape {shape} and dtype {dtype}: needs {count * dtype.itemsize} bytes, "
            f"the file gives {size}"
        )
    buf = data if isinstance(data, (bytearray, np.ndarray)) else bytearray(data)
    flat = np.frombuffer(buf, dtype=dtype, count=count)
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def build_object_array(items: Any, shape: Any, *, fortran: bool = False) -> Any:
    """An object array holding values shoal already built (never objects the file made)."""
    import numpy as np

    shape = check_shape(shape)
    if type(items) is not list or len(items) != _count(shape) or type(fortran) is not bool:
        raise _refuse(f"object array data that is not a list of {_count(shape)} items")
    flat = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):  # one by one: numpy must not treat a list item as a row
        flat[i] = v
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def build_scalar(dtype: Any, data: Any) -> Any:
    """A NumPy scalar from its dtype and exactly ``itemsize`` raw bytes."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _refuse("a scalar whose dtype is not a plain dtype shoal built")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise _refuse(f"scalar data for {dtype}: expected {dtype.itemsize} raw bytes")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]
