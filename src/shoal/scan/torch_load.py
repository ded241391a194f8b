"""torch checkpoints (zip and legacy formats) built by shoal's interpreter, never by torch.load.

Storages come from raw bytes whose length must match the element count the pickle declares;
tensors are strided views of them whose every element lies inside the storage; parameters wrap
such tensors. Needs the ``torch`` extra (the tensors are torch tensors).
"""

from __future__ import annotations

import collections
import struct
import zipfile
from typing import IO, Any

from shoal.errors import ConfigError
from shoal.scan.archives import member_source, torch_pickle_member
from shoal.scan.brief import brief
from shoal.scan.builders import empty_bytes
from shoal.scan.report import ScanLimits
from shoal.scan.streams import Budget as StreamBudget
from shoal.scan.streams import ByteReader
from shoal.scan.unpickle import Budget, Reconstructor, Unpickler, internal, refuse

__all__ = ["load_torch_legacy", "load_torch_zip"]

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# A tensor view costs about 600 bytes (its Python object and TensorImpl; measured as RSS over
# 500,000 as_strided views), however few bytes of pickle name it: 15 bytes through the memo.
_TENSOR_BYTES = 1024
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError(
            "this is a torch checkpoint; install the torch extra (pip install 'shoal[torch]')"
        ) from None
    return torch


class _Storage:
    """A flat tensor over one storage's bytes (``tensor`` is None while only checking)."""

    __slots__ = ("dtype", "numel", "tensor")

    def __init__(self, dtype: Any, numel: int, tensor: Any) -> None:
        self.dtype = dtype
        self.numel = numel
        self.tensor = tensor


internal(_Storage)  # a storage is an argument of torch's rebuilders, never a value returned


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if type(v) is not tuple or len(v) > 64 or not all(type(x) is int and x >= 0 for x in v):
        raise refuse(f"tensor {what} {brief(v)}: expected a tuple of non-negative ints")
    return v


def _empty_hooks(v: Any) -> None:
    if v is not None and (type(v) not in (dict, collections.OrderedDict) or v):
        raise refuse("tensor backward hooks (they are code)")


def _tensor(storage: Any, offset: Any, size: Any, stride: Any) -> Any:
    if type(storage) is not _Storage:
        raise refuse("a tensor rebuilt from something other than a storage shoal read")
    if type(offset) is not int or offset < 0:
        raise refuse(f"tensor storage offset {brief(offset)}")
    size = _ints(size, "size")
    stride = _ints(stride, "stride")
    if len(size) != len(stride):
        raise refuse("tensor size and stride of different lengths")
    numel = 1
    last = offset
    for n, s in zip(size, stride, strict=True):
        numel *= n
        last += (n - 1) * s
    if numel and last >= storage.numel:
        raise refuse(f"a tensor view reaching element {last} of a {storage.numel}-element storage")
    if storage.tensor is None:
        return None
    return storage.tensor.as_strided(size, stride, offset)


def _rebuild_tensor(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    if len(args) != 4:
        raise refuse("torch._utils._rebuild_tensor arguments")
    vm.budget.add_objects(_TENSOR_BYTES)
    return _tensor(*args)


def _rebuild_tensor_v2(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    if len(args) not in (6, 7):
        raise refuse("torch._utils._rebuild_tensor_v2 arguments")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    if type(requires_grad) is not bool:
        raise refuse(f"requires_grad {brief(requires_grad)}")
    _empty_hooks(hooks)
    if len(args) == 7 and args[6] is not None and args[6] != {}:
        raise refuse("tensor metadata (Python attributes on a tensor)")
    vm.budget.add_objects(_TENSOR_BYTES)
    t = _tensor(storage, offset, size, stride)
    if t is not None and requires_grad:
        t.requires_grad_(True)
    return t


def _rebuild_parameter(vm: Unpickler, args: tuple[Any, ...]) -> Any:
    if len(args) == 4:
        if args[3] is not None and args[3] != {} and args[3] != ((), {}):
            raise refuse("parameter state (Python attributes on a parameter)")
        args = args[:3]
    if len(args) != 3:
        raise refuse("torch._utils._rebuild_parameter arguments")
    data, requires_grad, hooks = args
    vm.budget.add_objects(_TENSOR_BYTES)
    if type(requires_grad) is not bool:
        raise refuse(f"requires_grad {brief(requires_grad)}")
    _empty_hooks(hooks)
    if data is None:  # checking pass
        return None
    torch = _torch()
    if not isinstance(data, torch.Tensor) or type(data) is not torch.Tensor:
        raise refuse("a parameter around something other than a tensor shoal built")
    return torch.nn.Parameter(data, requires_grad)


def _globals() -> dict[tuple[str, str], Reconstructor]:
    t: dict[tuple[str, str], Reconstructor] = {}
    for name in _STORAGE_DTYPES:
        t[("torch", name)] = Reconstructor(f"torch.{name}", tag=("torch-storage", name))
    for name, fn in (
        ("_rebuild_tensor", _rebuild_tensor),
        ("_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("_rebuild_parameter", _rebuild_parameter),
        ("_rebuild_parameter_with_state", _rebuild_parameter),
    ):
        t[("torch._utils", name)] = Reconstructor(f"torch._utils.{name}", call=fn)
    return t


_GLOBALS = _globals()


def _storage_pid(pid: Any, legacy: bool) -> tuple[str, str, int]:
    """(dtype name, key, numel) of a ('storage', type, key, location, numel[, view]) id."""
    n = 6 if legacy else 5
    if type(pid) is not tuple or len(pid) != n or pid[0] != "storage":
        raise refuse(f"torch persistent id {brief(pid)}")
    tag = pid[1]
    if not (isinstance(tag, Reconstructor) and type(tag.tag) is tuple):
        raise refuse("a torch storage of an unknown type")
    key, location, numel = pid[2], pid[3], pid[4]
    if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
        raise refuse(f"torch persistent id {brief(pid)}")
    if legacy and pid[5] is not None:
        raise refuse("legacy torch storage views")
    return _STORAGE_DTYPES[tag.tag[1]], key, numel


def _flat(torch: Any, data: Any, dtype_name: str, numel: int) -> Any:
    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    size = memoryview(data).nbytes
    if size != numel * itemsize:
        raise refuse(f"a storage of {numel} {dtype_name} elements stored in {size} bytes")
    if not numel:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype)  # shares the bytearray: no copy


def _vm(reader: ByteReader, limits: ScanLimits, budget: Budget, persistent: Any) -> Unpickler:
    return Unpickler(
        reader, limits=limits, budget=budget, extra=_GLOBALS, persistent_load=persistent
    )


def load_torch_zip(path: str, limits: ScanLimits) -> Any:
    torch = _torch()
    budget = Budget(limits)
    stream_budget = StreamBudget(
        limits.max_total_bytes, ratio=limits.max_ratio, ratio_after=limits.ratio_after_bytes
    )
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        # torch's reader matches names ignoring ASCII case: two candidates are two readings
        pkls = [n for n in infos if torch_pickle_member(n)]
        if len(pkls) != 1 or pkls[0].count("/") > 1 or not pkls[0].endswith("data.pkl"):
            raise refuse("a torch archive without exactly one top-level data.pkl (in any case)")
        prefix = pkls[0][: -len("data.pkl")]
        order = infos.get(prefix + "byteorder")
        if (
            order is not None
            and bytes(_read_member(f, zf, order, limits, stream_budget)) != b"little"
        ):
            raise refuse("a big-endian torch archive")
        storages: dict[str, _Storage] = {}

        def persistent(pid: Any) -> _Storage:
            dtype_name, key, numel = _storage_pid(pid, legacy=False)
            if key in storages:
                st = storages[key]
                if st.numel != numel:
                    raise refuse(f"storage {brief(key)} declared with two sizes")
                return st
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise refuse(f"storage {brief(key)} is missing from the archive")
            data = _read_member(f, zf, info, limits, stream_budget)
            budget.add_read(data.nbytes)
            budget.add_built(data.nbytes)
            st = _Storage(dtype_name, numel, _flat(torch, data, dtype_name, numel))
            storages[key] = st
            return st

        src = member_source(f, zf, infos[pkls[0]], limits, stream_budget)
        if src is None:
            raise refuse("data.pkl uses a compression method shoal does not read")
        return _vm(ByteReader(src), limits, budget, persistent).load()


def _read_member(
    f: IO[bytes], zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ScanLimits, sb: Any
) -> Any:
    src = member_source(f, zf, info, limits, sb)
    if src is None:
        raise refuse(f"member {info.filename!r} uses a compression method shoal does not read")
    data, got = ByteReader(src).read_buffer(info.file_size, empty_bytes)
    if got != info.file_size:
        raise refuse(f"member {info.filename!r} is truncated")
    return data


def load_torch_legacy(path: str, limits: ScanLimits) -> Any:
    """Magic, protocol, sys_info, the object, storage keys, then each storage's raw bytes.

    The object pickle is interpreted twice: once to check it and learn its storages (whose
    bytes come after it), then again with the storages read.
    """
    torch = _torch()
    with open(path, "rb") as f:
        r = ByteReader(f)
        budget = Budget(limits)
        plain = Unpickler(r, limits=limits, budget=budget)
        if plain.load() != TORCH_LEGACY_MAGIC:
            raise refuse("a legacy torch file with the wrong magic number")
        if Unpickler(r, limits=limits, budget=budget).load() != 1001:
            raise refuse("an unsupported legacy torch protocol version")
        info = Unpickler(r, limits=limits, budget=budget).load()
        if type(info) is not dict or info.get("little_endian") is not True:
            raise refuse("a big-endian or malformed legacy torch file")
        start = r.pos
        declared: dict[str, tuple[str, int]] = {}

        def check(pid: Any) -> Any:
            dtype_name, key, numel = _storage_pid(pid, legacy=True)
            if declared.setdefault(key, (dtype_name, numel)) != (dtype_name, numel):
                raise refuse(f"storage {brief(key)} declared twice differently")
            return _Storage(dtype_name, numel, None)

        _vm(r, limits, budget, check).load()
        keys = Unpickler(r, limits=limits, budget=budget).load()
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise refuse("a legacy torch storage key list that is not a list of strings")
        if set(keys) != set(declared) or len(keys) != len(set(keys)):
            raise refuse("legacy torch storage keys that do not match the storages used")
        storages: dict[str, _Storage] = {}
        for key in keys:
            dtype_name, numel = declared[key]
            head = r.take(8)
            if len(head) != 8 or struct.unpack("<q", head)[0] != numel:
                raise refuse(f"legacy torch storage {brief(key)}: size header does not match")
            itemsize = torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()
            data, got = r.read_buffer(numel * itemsize, empty_bytes)
            if got != numel * itemsize:
                raise refuse(f"legacy torch storage {brief(key)} is truncated")
            budget.add_read(got)
            budget.add_built(got)
            storages[key] = _Storage(dtype_name, numel, _flat(torch, data, dtype_name, numel))
        f.seek(start)
        r2 = ByteReader(f, origin=start)

        def real(pid: Any) -> Any:
            return storages[_storage_pid(pid, legacy=True)[1]]

        return _vm(r2, limits, budget, real).load()
