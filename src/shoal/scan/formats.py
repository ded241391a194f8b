"""Scanners for the non-pickle formats: NumPy .npy, safetensors, ONNX and Keras configs.

Each takes a ``ByteReader`` positioned at the start of the data and reports into a ``Sink``;
none of them imports or runs anything named by the file.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
from collections.abc import Iterator
from typing import IO, Any

from shoal.errors import UnsafeModelError
from shoal.scan.allowlist import classify_global
from shoal.scan.hdf5 import root_string_attributes
from shoal.scan.pickle_scan import Sink, scan_pickle_stream
from shoal.scan.report import ScanLimits, Severity
from shoal.scan.streams import ByteReader

__all__ = [
    "HDF5_MAGIC",
    "analyze_keras_config",
    "looks_like_safetensors",
    "npy_header",
    "scan_hdf5",
    "scan_json",
    "scan_npy",
    "scan_onnx",
    "scan_safetensors",
]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# --- NumPy .npy ------------------------------------------------------------------------------


def npy_header(r: ByteReader, limits: ScanLimits) -> tuple[Any, tuple[int, ...], bool]:
    """(dtype, shape, fortran) of a .npy header, parsed by NumPy's own header reader (its
    grammar: ``ast.literal_eval``, Python 2 literals, its key and type checks), with no header
    size limit but shoal's: ``np.load(allow_pickle=True)`` ignores its own."""
    magic = r.take(8)
    if len(magic) != 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3) or magic[7]:
        raise UnsafeModelError("refused: not a .npy file (bad magic or version)")
    width = 2 if magic[6] == 1 else 4
    size_bytes = r.take(width)
    if len(size_bytes) != width:
        raise UnsafeModelError("refused: a truncated .npy header")
    hlen = struct.unpack("<H" if width == 2 else "<I", size_bytes)[0]
    if hlen > limits.max_header_bytes:
        raise UnsafeModelError(
            f"refused: a .npy header of {hlen} bytes (ScanLimits.max_header_bytes)"
        )
    raw = r.take(hlen)
    if len(raw) != hlen:
        raise UnsafeModelError("refused: a truncated .npy header")
    fp = io.BytesIO(magic + size_bytes + raw)
    fp.seek(8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns about Python 2 headers it accepts
            shape, fortran, dtype = _numpy_header_reader()(
                fp, (magic[6], 0), max_header_size=hlen + 1
            )
    except Exception as exc:  # NumPy's parser raises many types (tokenize errors too)
        raise UnsafeModelError(f"refused: a .npy header NumPy rejects: {exc!r}") from None
    if not all(type(d) is int and d >= 0 for d in shape):
        raise UnsafeModelError(f"refused: .npy shape {shape!r} (NumPy accepts it, shoal does not)")
    return dtype, tuple(shape), bool(fortran)


def _numpy_header_reader() -> Any:
    """NumPy's own .npy header parser, wherever this NumPy version keeps it."""
    from numpy.lib import format as npformat

    reader = getattr(npformat, "_read_array_header", None)
    if reader is None:
        from numpy.lib import _format_impl

        reader = _format_impl._read_array_header  # type: ignore[attr-defined]
    return reader


def scan_npy(r: ByteReader, sink: Sink, *, limits: ScanLimits) -> str:
    """Read the header as NumPy does; object arrays carry a pickle, which is analysed in full."""
    start = r.pos
    try:
        dtype, shape, _fortran = npy_header(r, limits)
    except UnsafeModelError as exc:
        sink.add(Severity.MEDIUM, "malformed", f".npy: {exc}", start)
        # np.load(allow_pickle=True) may still read what follows: analyse it if it is a pickle
        scan_pickle_stream(r, sink, limits=limits, probe=True, joblib_arrays=False)
        return "numpy"
    if dtype.hasobject:
        sink.add(
            Severity.LOW,
            "object-array",
            "object array: its data is a pickle (np.load refuses it unless allow_pickle=True)",
            r.pos,
        )
        scan_pickle_stream(r, sink, limits=limits, joblib_arrays=False)  # np.load: pickle.load
        return "numpy"
    count = 1
    for d in shape:
        count *= d
    size = count * dtype.itemsize
    if r.skip(size) != size:
        sink.add(
            Severity.MEDIUM, "truncated", f".npy data shorter than the {size} bytes declared", r.pos
        )
    elif not r.at_eof():
        sink.add(Severity.LOW, "trailing-data", "data after the array (np.load ignores it)", r.pos)
    return "numpy"


# --- safetensors -----------------------------------------------------------------------------

_ST_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_ST_MAX_HEADER = 100_000_000


def looks_like_safetensors(head: bytes, size: int | None) -> bool:
    if len(head) < 10:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    if n < 2 or n > _ST_MAX_HEADER or (size is not None and n > size - 8):
        return False
    return head[8:9] == b"{"


def scan_safetensors(r: ByteReader, sink: Sink, *, limits: ScanLimits, size: int | None) -> str:
    """Validate the JSON header and that the tensors tile the data region exactly."""
    start = r.pos
    n = struct.unpack("<Q", r.take(8))[0]
    if n > limits.max_header_bytes:
        sink.add(Severity.MEDIUM, "limit", f"safetensors header of {n} bytes exceeds the limit", 0)
        return "safetensors"
    raw = r.take(n)
    problems: list[str] = []
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        sink.add(
            Severity.MEDIUM, "malformed", f"safetensors header is not valid JSON: {exc}", start
        )
        return "safetensors"
    if not isinstance(header, dict):
        sink.add(Severity.MEDIUM, "malformed", "safetensors header is not a JSON object", start)
        return "safetensors"
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                problems.append("__metadata__ must map strings to strings")
            continue
        problem = _st_entry_problem(entry)
        if problem:
            problems.append(f"tensor {name!r}: {problem}")
            continue
        lo, hi = entry["data_offsets"]
        spans.append((lo, hi, name))
    spans.sort()
    cursor = 0
    for lo, hi, name in spans:
        if lo != cursor:
            problems.append(f"tensor {name!r} starts at {lo}, expected {cursor} (gap or overlap)")
            break
        cursor = hi
    data_len = None if size is None else size - 8 - n
    if data_len is not None and cursor != data_len:
        problems.append(f"tensors cover {cursor} bytes but the data region has {data_len}")
    elif data_len is None and r.skip(cursor) != cursor:
        problems.append("data region is truncated")
    for p in problems[:20]:
        sink.add(
            Severity.MEDIUM, "malformed", f"safetensors: {p} (the loader will refuse it)", start
        )
    return "safetensors"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _st_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return "entry must have exactly dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ST_BITS:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return "shape must be a list of non-negative integers"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        return "data_offsets must be [begin, end] with 0 <= begin <= end"
    count = 1
    for d in shape:
        count *= d
    nbytes = count * _ST_BITS[dtype]
    if nbytes % 8 or nbytes // 8 != offsets[1] - offsets[0]:
        return f"{offsets[1] - offsets[0]} bytes stored for {count} elements of {dtype}"
    return None


# --- ONNX (protobuf wire format) -------------------------------------------------------------

# ModelProto fields and their wire types (0 varint, 2 length-delimited).
_ONNX_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ONNX_STD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"}


class _PbError(Exception):
    pass


def _varint(r: ByteReader) -> int:
    shift = 0
    result = 0
    for _ in range(10):
        b = r.byte()
        if b < 0:
            raise _PbError("truncated varint")
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result
        shift += 7
    raise _PbError("varint longer than 10 bytes")


def _fields(r: ByteReader, end: int | None) -> Iterator[tuple[int, int, int]]:
    """Yield (field number, wire type, value-or-length) until ``end`` (or EOF when None).

    For length-delimited fields the caller must consume or skip exactly ``length`` bytes.
    """
    while True:
        if end is not None:
            if r.pos == end:
                return
            if r.pos > end:
                raise _PbError("field runs past the end of its message")
        elif r.at_eof():
            return
        key = _varint(r)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _PbError("field number 0")
        if wire == 0:
            yield field, wire, _varint(r)
        elif wire == 1:
            if len(r.take(8)) != 8:
                raise _PbError("truncated fixed64")
            yield field, wire, 0
        elif wire == 5:
            if len(r.take(4)) != 4:
                raise _PbError("truncated fixed32")
            yield field, wire, 0
        elif wire == 2:
            yield field, wire, _varint(r)
        else:
            raise _PbError(f"unsupported wire type {wire}")


def _skip(r: ByteReader, n: int) -> None:
    if r.skip(n) != n:
        raise _PbError("length-delimited field is truncated")


def _string(r: ByteReader, n: int) -> str:
    if n > 1 << 16:
        _skip(r, n)
        return "<long string>"
    data = r.take(n)
    if len(data) != n:
        raise _PbError("truncated string")
    return data.decode("utf-8", "replace")


def scan_onnx(r: ByteReader, sink: Sink, *, strict: bool) -> str:
    """Walk ModelProto's top-level fields; look inside the graph for external data and ops.

    Returns "" when ``strict`` is False and the bytes are not an ONNX model at all.
    """
    start = r.pos
    seen: set[int] = set()
    ir_version = None
    try:
        for field, wire, value in _fields(r, None):
            expected = _ONNX_MODEL_FIELDS.get(field)
            if expected is not None and expected != wire:
                raise _PbError(f"field {field} has wire type {wire}, expected {expected}")
            if not seen and field != 1 and not strict:
                return ""
            seen.add(field)
            if field == 1:
                ir_version = value
            elif wire == 2 and field == 7:
                _onnx_graph(r, r.pos + value, sink)
            elif wire == 2:
                _skip(r, value)
    except _PbError as exc:
        if not strict and len(seen) < 2:
            return ""
        sink.add(Severity.MEDIUM, "malformed", f"ONNX protobuf is malformed: {exc}", start)
        return "onnx"
    if ir_version is None or 7 not in seen:
        if not strict:
            return ""
        sink.add(Severity.MEDIUM, "malformed", "ONNX model lacks ir_version or graph", start)
    elif not 1 <= ir_version <= 64:
        sink.add(Severity.MEDIUM, "malformed", f"implausible ONNX ir_version {ir_version}", start)
    return "onnx"


def _onnx_graph(r: ByteReader, end: int, sink: Sink) -> None:
    for field, wire, value in _fields(r, end):
        if wire != 2:
            continue
        if field == 1:  # NodeProto
            _onnx_node(r, r.pos + value, sink)
        elif field == 5:  # initializer TensorProto
            _onnx_tensor(r, r.pos + value, sink)
        else:
            _skip(r, value)


def _onnx_node(r: ByteReader, end: int, sink: Sink) -> None:
    op_type = ""
    for field, wire, value in _fields(r, end):
        if wire != 2:
            continue
        if field == 4:
            op_type = _string(r, value)
        elif field == 7:
            domain = _string(r, value)
            if domain not in _ONNX_STD_DOMAINS:
                sink.add(
                    Severity.LOW,
                    "custom-operator",
                    f"operator {op_type or '?'} from custom domain {domain!r} needs a "
                    "separately installed kernel library",
                    r.pos,
                )
        else:
            _skip(r, value)


def _onnx_tensor(r: ByteReader, end: int, sink: Sink) -> None:
    name = ""
    for field, wire, value in _fields(r, end):
        if wire != 2:
            continue
        if field == 8:
            name = _string(r, value)
        elif field == 13:  # external_data: StringStringEntryProto
            entry_end = r.pos + value
            key = val = ""
            for f2, w2, v2 in _fields(r, entry_end):
                if w2 != 2:
                    continue
                if f2 == 1:
                    key = _string(r, v2)
                elif f2 == 2:
                    val = _string(r, v2)
                else:
                    _skip(r, v2)
            if key == "location":
                _external_location(name, val, sink, r.pos)
        else:
            _skip(r, value)


def _external_location(tensor: str, location: str, sink: Sink, offset: int) -> None:
    parts = re.split(r"[\\/]+", location)
    if location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location) or ".." in parts:
        sink.add(
            Severity.HIGH,
            "path-traversal",
            f"tensor {tensor!r} reads external data from {location!r}, outside the model folder",
            offset,
        )
    else:
        sink.add(
            Severity.LOW,
            "external-data",
            f"tensor {tensor!r} reads external data file {location!r} (scan it too)",
            offset,
        )


# --- Keras configs ---------------------------------------------------------------------------

_KERAS_MODULES = re.compile(
    r"(keras|tf_keras|keras_hub|keras_nlp|keras_cv)(\..*)?|tensorflow\.(python\.)?keras(\..*)?"
)
_KERAS_KNOWN = _words(
    """
    Sequential Functional Model InputLayer Dense Dropout Flatten Reshape Permute RepeatVector
    Activation ActivityRegularization Masking Embedding Conv1D Conv2D Conv3D Conv1DTranspose
    Conv2DTranspose Conv3DTranspose SeparableConv1D SeparableConv2D DepthwiseConv1D
    DepthwiseConv2D MaxPooling1D MaxPooling2D MaxPooling3D AveragePooling1D AveragePooling2D
    AveragePooling3D GlobalMaxPooling1D GlobalMaxPooling2D GlobalMaxPooling3D
    GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D LSTM GRU SimpleRNN
    Bidirectional TimeDistributed RNN LSTMCell GRUCell SimpleRNNCell StackedRNNCells ConvLSTM1D
    ConvLSTM2D ConvLSTM3D BatchNormalization LayerNormalization GroupNormalization
    UnitNormalization Normalization Add Subtract Multiply Average Maximum Minimum Concatenate
    Dot ZeroPadding1D ZeroPadding2D ZeroPadding3D Cropping1D Cropping2D Cropping3D
    UpSampling1D UpSampling2D UpSampling3D ReLU LeakyReLU PReLU ELU Softmax ThresholdedReLU
    GaussianNoise GaussianDropout AlphaDropout SpatialDropout1D SpatialDropout2D
    SpatialDropout3D MultiHeadAttention Attention AdditiveAttention GroupQueryAttention
    Identity Rescaling Resizing CenterCrop RandomFlip RandomRotation RandomZoom RandomCrop
    RandomTranslation RandomContrast RandomBrightness StringLookup IntegerLookup TextVectorization
    CategoryEncoding Hashing Discretization EinsumDense Wrapper InputSpec Input
    GlorotUniform GlorotNormal HeUniform HeNormal LecunUniform LecunNormal Zeros Ones Constant
    RandomUniform RandomNormal TruncatedNormal Orthogonal Identity VarianceScaling
    L1 L2 L1L2 OrthogonalRegularizer MaxNorm MinMaxNorm NonNeg UnitNorm
    Adam AdamW SGD RMSprop Adagrad Adadelta Adamax Nadam Ftrl Lion LossScaleOptimizer
    ExponentialDecay PiecewiseConstantDecay PolynomialDecay InverseTimeDecay CosineDecay
    CosineDecayRestarts
    MeanSquaredError MeanAbsoluteError CategoricalCrossentropy SparseCategoricalCrossentropy
    BinaryCrossentropy Hinge Huber KLDivergence LogCosh Poisson CosineSimilarity
    Accuracy BinaryAccuracy CategoricalAccuracy SparseCategoricalAccuracy TopKCategoricalAccuracy
    AUC Precision Recall Mean MeanMetricWrapper
    DTypePolicy DTypePolicyMap FloatDTypePolicy QuantizedDTypePolicy Policy
    __tuple__ __numpy__ __tensor__ __bytes__ __typespec__ TensorShape
    """
)
_KERAS_SAFE_DUNDER = frozenset(
    {"__tuple__", "__numpy__", "__tensor__", "__bytes__", "__typespec__"}
)
_MAX_JSON_NODES = 2_000_000


def analyze_keras_config(config: Any, sink: Sink, *, offset: int | None) -> None:
    """Flag layers and objects in a Keras config that carry or import code."""
    todo: list[Any] = [config]
    nodes = 0
    while todo:
        node = todo.pop()
        nodes += 1
        if nodes > _MAX_JSON_NODES:
            sink.add(Severity.MEDIUM, "limit", "Keras config too large to check fully", offset)
            return
        if isinstance(node, list):
            todo.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        todo.extend(node.values())
        cn = node.get("class_name")
        if not isinstance(cn, str):
            continue
        _keras_object(node, cn, sink, offset)


def _keras_object(node: dict[str, Any], cn: str, sink: Sink, offset: int | None) -> None:
    module = node.get("module")
    cfg = node.get("config")
    cfg = cfg if isinstance(cfg, dict) else {}
    if cn == "Lambda":
        fn = cfg.get("function")
        ftype = cfg.get("function_type")
        if ftype == "function" and isinstance(fn, str):
            mod = cfg.get("module")
            sev, why = classify_global(str(mod or "<unknown>"), fn)
            sink.add(
                max(sev, Severity.HIGH),
                "lambda-layer",
                f"Lambda layer {cfg.get('name', '?')!r} calls function {mod}.{fn}: {why}",
                offset,
            )
        else:
            sink.add(
                Severity.CRITICAL,
                "lambda-layer",
                f"Lambda layer {cfg.get('name', '?')!r} carries Python bytecode that runs on load",
                offset,
            )
        return
    if cn == "__lambda__":
        sink.add(Severity.CRITICAL, "lambda-layer", "serialized Python lambda (bytecode)", offset)
        return
    if cn in ("TFOpLambda", "SlicingOpLambda"):
        sink.add(
            Severity.MEDIUM,
            "tf-op-layer",
            f"{cn} layer calls TensorFlow function {cfg.get('function', '?')!r} by name",
            offset,
        )
        return
    if cn == "function":
        # Keras 3 function references: {"module": m, "class_name": "function", "config": name}
        name = node.get("config")
        if isinstance(module, str) and _KERAS_MODULES.fullmatch(module):
            return
        sev, why = classify_global(str(module), str(name))
        sink.add(
            max(sev, Severity.HIGH),
            "function-reference",
            f"config references function {module}.{name}: {why}",
            offset,
        )
        return
    if isinstance(module, str) and not _KERAS_MODULES.fullmatch(module):
        sev, why = classify_global(module, cn)
        sink.add(
            max(sev, Severity.HIGH),
            "custom-object",
            f"config imports {module}.{cn} (outside Keras): {why}",
            offset,
        )
        return
    registered = node.get("registered_name")
    custom = isinstance(registered, str) and ">" in registered
    if custom or (module is None and cn not in _KERAS_KNOWN):
        sink.add(
            Severity.MEDIUM,
            "custom-object",
            f"custom class {cn!r} (registered as {registered!r}) needs user code to load",
            offset,
        )
    elif cn.startswith("__") and cn not in _KERAS_SAFE_DUNDER:
        sink.add(Severity.MEDIUM, "custom-object", f"unknown special object {cn!r}", offset)


def _parse_json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def scan_json(r: ByteReader, sink: Sink, *, limits: ScanLimits) -> str:
    """A JSON document: if it is a Keras model config, check it; otherwise it is just data."""
    start = r.pos
    data = r.take(limits.max_header_bytes + 1)
    if len(data) > limits.max_header_bytes:
        sink.add(Severity.MEDIUM, "limit", "JSON document larger than the header limit", start)
        return "json"
    try:
        doc = _parse_json(data)
    except (ValueError, RecursionError):
        return ""
    if _is_keras_config(doc):
        analyze_keras_config(doc, sink, offset=start)
        return "keras-config"
    return "json"


def _is_keras_config(doc: Any) -> bool:
    return isinstance(doc, dict) and (isinstance(doc.get("class_name"), str) and "config" in doc)


# --- HDF5 (Keras .h5) ------------------------------------------------------------------------

_CONFIG_START = re.compile(rb'\{\s*"(?:class_name|module|config|keras_version|name)"\s*:')
_MAX_CANDIDATES = 256


_CONFIG_KEYS = ("model_config", "training_config")


def _fast_root_attributes(f: IO[bytes]) -> dict[str, str] | None:
    try:
        size = f.seek(0, 2)
    except (OSError, ValueError):
        return None
    return root_string_attributes(f, size, _CONFIG_KEYS)


def _optional_h5py() -> Any:
    """h5py parses the attribute table instead of guessing; optional, so None if missing."""
    try:
        import h5py
    except ImportError:
        return None
    return h5py


def scan_hdf5(f: IO[bytes], sink: Sink, *, limits: ScanLimits, weights_only: bool) -> str:
    """Find Keras configs in a (seekable) HDF5 file: through h5py when installed, else by byte
    search. ``weights_only`` marks a weights file inside a .keras archive, which never holds
    a config, so finding none there is expected rather than unverified.
    """
    configs: list[tuple[Any, int | None]] = []
    verified = False
    if not weights_only:  # weights cannot carry code
        fast = _fast_root_attributes(f)
        if fast is not None:
            try:
                configs = [(json.loads(fast[k]), None) for k in _CONFIG_KEYS if k in fast]
            except (ValueError, RecursionError) as exc:
                sink.add(Severity.MEDIUM, "malformed", f"HDF5 file cannot be parsed: {exc}", 0)
                return "hdf5"
            for doc, offset in configs:
                analyze_keras_config(doc, sink, offset=offset)
            return "keras-h5" if configs else "hdf5"
    h5py = _optional_h5py() if not weights_only else None
    if h5py is not None:
        try:
            f.seek(0)
            with h5py.File(f, "r") as h5:
                for key in _CONFIG_KEYS:
                    if key in h5.attrs:
                        raw = h5.attrs[key]
                        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                        configs.append((json.loads(text), None))
            verified = True
        except Exception as exc:  # libhdf5 raises many types on hostile files
            sink.add(Severity.MEDIUM, "malformed", f"HDF5 file cannot be parsed: {exc}", 0)
            return "hdf5"
    found_name = False
    if not verified:
        found_name, completed = _search_configs(f, limits, configs)
        if not completed:
            sink.add(Severity.MEDIUM, "limit", "too many JSON-like fragments to check", None)
    for doc, offset in configs:
        analyze_keras_config(doc, sink, offset=offset)
    fmt = "keras-h5" if configs else "hdf5"
    if verified or (weights_only and not found_name):
        return fmt
    if configs:
        sink.add(
            Severity.LOW,
            "unverified",
            "h5py is not installed: Keras config located by byte search, HDF5 structure not parsed",
            None,
        )
    elif found_name:
        sink.add(
            Severity.MEDIUM,
            "unverifiable",
            "a Keras model_config attribute exists but could not be read without h5py",
            None,
        )
    else:
        sink.add(
            Severity.MEDIUM,
            "unverifiable",
            "HDF5 file: no Keras config found by byte search and h5py is not installed to confirm",
            None,
        )
    return fmt


def _search_configs(
    f: IO[bytes], limits: ScanLimits, out: list[tuple[Any, int | None]]
) -> tuple[bool, bool]:
    """Byte-search for JSON objects that are Keras configs. Returns (saw_name, completed)."""
    found_name = False
    window = 1 << 20
    overlap = 64
    f.seek(0)
    r = ByteReader(f)
    tail = b""
    candidates: list[int] = []
    while True:
        chunk = r.take(window)
        if not chunk:
            break
        buf = tail + chunk
        buf_start = r.pos - len(buf)
        found_name = found_name or b"model_config" in buf
        for m in _CONFIG_START.finditer(buf):
            pos = buf_start + m.start()
            if not candidates or pos > candidates[-1]:
                candidates.append(pos)
            if len(candidates) > _MAX_CANDIDATES:
                return found_name, False
        tail = buf[-overlap:]
    covered_until = -1
    for pos in candidates:
        if pos < covered_until:
            continue  # inside a config already decoded
        doc, end = _decode_at(f, pos, limits.max_header_bytes)
        if doc is not None and _is_keras_config(doc):
            out.append((doc, pos))
            covered_until = end
    return found_name, True


def _decode_at(f: IO[bytes], pos: int, cap: int) -> tuple[Any, int]:
    size = 1 << 16
    decoder = json.JSONDecoder()
    while True:
        f.seek(pos)
        data = f.read(size)
        text = data.decode("utf-8", "replace")
        try:
            doc, end = decoder.raw_decode(text)
            return doc, pos + len(text[:end].encode("utf-8", "replace"))
        except (ValueError, RecursionError) as exc:
            err_pos = getattr(exc, "pos", 0) or 0
            truncated = err_pos >= len(text) - 64 or str(exc).startswith("Unterminated string")
            if len(data) < size or size >= cap or not truncated:
                return None, pos
            size = min(size * 8, cap)
