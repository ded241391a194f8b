"""Corpus for benchmarks/scan.py: hostile model files (hand-assembled) and benign real ones.

The hostile files reproduce the bypass classes reported against pickle scanners (ModelScan and
picklescan issue trackers): indirect imports, memo tricks, alternative call opcodes, and payloads
hidden in NumPy object arrays, torch zips, nested or compressed containers and Keras configs.
Nothing here is ever unpickled; the payloads only run `echo`.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import pickle
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from pickle import (  # opcode constants for hand assembly
    BINGET,
    BINPUT,
    BUILD,
    DICT,
    EMPTY_DICT,
    GLOBAL,
    INST,
    MARK,
    MEMOIZE,
    NEWOBJ,
    NONE,
    OBJ,
    POP,
    PROTO,
    REDUCE,
    STACK_GLOBAL,
    STOP,
    STRING,
    TUPLE,
    TUPLE2,
)
from typing import Any

CMD = "echo scan-benchmark"


def su(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return GLOBAL + f"{module}\n{name}\n".encode()


def sglob(module: str, name: str) -> bytes:
    return su(module) + su(name) + STACK_GLOBAL


def call(func: bytes, *args: bytes) -> bytes:
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def p4(body: bytes) -> bytes:
    return PROTO + b"\x04" + body + STOP


def p2(body: bytes) -> bytes:
    return PROTO + b"\x02" + body + STOP


def p0(body: bytes) -> bytes:
    return body + STOP


# --- hostile pickles -------------------------------------------------------------------------


def hostile_pickles() -> dict[str, bytes]:
    s = su
    out = {
        "os_system_proto0.pkl": p0(
            glob("os", "system") + MARK + STRING + b"'echo'\n" + TUPLE + REDUCE
        ),
        "posix_system_proto2.pkl": p2(call(glob("posix", "system"), s(CMD))),
        "builtins_eval_stack_global.pkl": p4(call(sglob("builtins", "eval"), s("1+1"))),
        "builtins_exec.pkl": p4(call(sglob("builtins", "exec"), s("x=1"))),
        "py2_builtin_eval.pkl": p0(
            glob("__builtin__", "eval") + MARK + STRING + b"'1'\n" + TUPLE + REDUCE
        ),
        "subprocess_popen_newobj.pkl": p4(
            sglob("subprocess", "Popen") + MARK + s(CMD) + TUPLE + NEWOBJ
        ),
        "collect_env_run.pkl": p4(call(sglob("torch.utils.collect_env", "run"), s(CMD))),
        "timeit.pkl": p4(
            call(
                sglob("timeit", "timeit"), s(f"__import__('os').system('{CMD}')"), s("pass"), s("1")
            )
        ),
        "numpy_runstring.pkl": p4(
            call(sglob("numpy.testing._private.utils", "runstring"), s("x=1"), EMPTY_DICT)
        ),
        "operator_methodcaller.pkl": p4(
            call(
                call(sglob("operator", "methodcaller"), s("system"), s(CMD)),
                call(sglob("importlib", "import_module"), s("os")),
            )
        ),
        "operator_attrgetter_chain.pkl": p4(
            call(
                call(
                    call(sglob("operator", "attrgetter"), s("path.os.system")),
                    call(sglob("importlib", "import_module"), s("os")),
                ),
                s(CMD),
            )
        ),
        "attrgetter_on_safe_module.pkl": p4(
            call(
                call(
                    call(sglob("operator", "attrgetter"), s("system")),
                    sglob("numpy.core._internal", "sys"),
                ),
                s(CMD),
            )
        ),
        "builtins_getattr.pkl": p4(
            call(
                call(
                    sglob("builtins", "getattr"),
                    call(sglob("builtins", "__import__"), s("os")),
                    s("system"),
                ),
                s(CMD),
            )
        ),
        "memo_indirect_stack_global.pkl": p4(
            s("os")
            + MEMOIZE
            + s("system")
            + MEMOIZE
            + POP
            + POP
            + BINGET
            + b"\x00"
            + BINGET
            + b"\x01"
            + STACK_GLOBAL
            + MARK
            + s(CMD)
            + TUPLE
            + REDUCE
        ),
        "computed_stack_global.pkl": p4(
            # module name produced by a call (str("os")) instead of a string constant
            call(sglob("builtins", "str"), s("os"))
            + s("system")
            + STACK_GLOBAL
            + MARK
            + s(CMD)
            + TUPLE
            + REDUCE
        ),
        "build_on_global_dotted.pkl": p4(
            # ModelScan #85: BUILD sets attributes on numpy.prod; dotted names read them back
            glob("numpy", "prod")
            + NONE
            + MARK
            + s("a")
            + s("os")
            + DICT
            + TUPLE2
            + BUILD
            + POP
            + glob("numpy", "prod.a")
            + BINPUT
            + b"\x00"
            + POP
            + BINGET
            + b"\x00"
            + s("system")
            + STACK_GLOBAL
            + MARK
            + s(CMD)
            + TUPLE
            + REDUCE
        ),
        "numpy_dunder_builtins.pkl": p4(
            # ModelScan #330: numpy.__builtins__ reaches eval
            call(
                call(sglob("builtins", "dict.get"), sglob("numpy", "__builtins__"), s("eval")),
                s("1+1"),
            )
        ),
        "sys_modules_dotted.pkl": p4(
            call(sglob("numpy", "core._internal.sys.modules.get"), s("os"))
        ),
        "inst_opcode.pkl": p0(MARK + STRING + b"'echo'\n" + INST + b"os\nsystem\n"),
        "obj_opcode.pkl": p2(MARK + glob("os", "system") + s(CMD) + OBJ),
        "ext_opcode.pkl": p2(b"\x83" + struct.pack("<H", 0x3F00) + MARK + s(CMD) + TUPLE + REDUCE),
        "pickle_loads_nested.pkl": p4(call(sglob("_pickle", "loads"), b"C\x05hello")),
        "importlib_import_module.pkl": p4(call(sglob("importlib", "import_module"), s("os"))),
        "pkgutil_resolve_name.pkl": p4(
            call(call(sglob("pkgutil", "resolve_name"), s("os:system")), s(CMD))
        ),
        "runpy.pkl": p4(call(sglob("runpy", "_run_code"), s("x=1"), EMPTY_DICT)),
        "webbrowser.pkl": p4(call(sglob("webbrowser", "open"), s("http://127.0.0.1/"))),
        "functools_partial.pkl": p4(
            call(call(sglob("functools", "partial"), sglob("os", "system"), s(CMD)))
        ),
        "shutil_rmtree.pkl": p4(call(sglob("shutil", "rmtree"), s("/nonexistent-scan-benchmark"))),
        "socket.pkl": p4(
            call(sglob("socket", "create_connection"), s("127.0.0.1") + b"K\x01" + TUPLE2)
        ),
        "numpy_load.pkl": p4(call(sglob("numpy", "load"), s("x.npy"))),
        "torch_load_nested.pkl": p4(call(sglob("torch.serialization", "load"), s("x.pt"))),
        "unknown_module.pkl": p4(call(sglob("evilpkg.payload", "Run"), s(CMD))),
        "mailcap.pkl": p4(call(sglob("mailcap", "findmatch"), EMPTY_DICT, s("text/plain"))),
        "pdb_run.pkl": p4(call(sglob("pdb", "run"), s("x=1"))),
        "code_interpreter.pkl": p4(call(sglob("code", "InteractiveInterpreter"))),
        "ctypes.pkl": p4(call(sglob("ctypes", "CDLL"), s("libc.so.6"))),
    }
    benign_first = pickle.dumps({"weights": [1.0, 2.0]}, protocol=4)
    out["concatenated_second_evil.pkl"] = benign_first + out["posix_system_proto2.pkl"]
    return out


# --- hostile containers ----------------------------------------------------------------------


class _Evil:
    """Pickles as a call to posix/nt system; never instantiated on load here."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (CMD,))


def _zip(members: dict[str, bytes], *, method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _keras_zip(config: dict[str, Any]) -> bytes:
    meta = {"keras_version": "3.6.0", "date_saved": "2026-01-01@00:00:00"}
    return _zip(
        {
            "metadata.json": json.dumps(meta).encode(),
            "config.json": json.dumps(config).encode(),
            "model.weights.h5": _weights_h5(),
        },
        method=zipfile.ZIP_DEFLATED,
    )


def _weights_h5() -> bytes:
    """A weights-only HDF5 file as .keras archives hold (a stand-in when h5py is missing)."""
    try:
        import h5py
        import numpy as np
    except ImportError:
        return b"\x89HDF\r\n\x1a\n" + bytes(64)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.ones((4, 8), dtype=np.float32))
    return buf.getvalue()


def _dense(name: str, units: int) -> dict[str, Any]:
    return {
        "module": "keras.layers",
        "class_name": "Dense",
        "config": {
            "name": name,
            "units": units,
            "activation": "relu",
            "kernel_initializer": {
                "module": "keras.initializers",
                "class_name": "GlorotUniform",
                "config": {"seed": None},
                "registered_name": None,
            },
        },
        "registered_name": None,
    }


def keras_config(extra_layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [_dense("d1", 8), *extra_layers, _dense("d2", 2)],
        },
        "registered_name": None,
    }


def lambda_layer_k3() -> dict[str, Any]:
    code = base64.b64encode(b"\xe3" + bytes(40)).decode()
    return {
        "module": "keras.layers",
        "class_name": "Lambda",
        "config": {
            "name": "lambda",
            "function": {
                "class_name": "__lambda__",
                "config": {"code": code, "defaults": None, "closure": None},
            },
        },
        "registered_name": None,
    }


def lambda_layer_k2() -> dict[str, Any]:
    code = base64.b64encode(b"\xe3" + bytes(40)).decode()
    return {
        "class_name": "Lambda",
        "config": {
            "name": "lambda_1",
            "function": [code, None, None],
            "function_type": "lambda",
            "module": "__main__",
            "output_shape": None,
            "arguments": {},
        },
    }


def keras2_model_config(layers: list[dict[str, Any]]) -> dict[str, Any]:
    dense = [
        {"class_name": "Dense", "config": {"name": f"dense_{i}", "units": 4, "activation": "relu"}}
        for i in range(2)
    ]
    return {
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": [dense[0], *layers, dense[1]]},
    }


def write_keras_h5(path: Path, config: dict[str, Any]) -> None:
    """A legacy Keras .h5: real HDF5 when h5py is available, else a byte-level stand-in."""
    try:
        import h5py
        import numpy as np
    except ImportError:
        body = json.dumps(config).encode()
        path.write_bytes(
            b"\x89HDF\r\n\x1a\n" + bytes(200) + b"model_config" + bytes(40) + body + bytes(100)
        )
        return
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        g = f.create_group("model_weights")
        g.create_dataset("dense_0/kernel:0", data=np.ones((4, 4), dtype=np.float32))


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb(field: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _pb_varint(field << 3) + _pb_varint(value)
    return _pb_varint(field << 3 | 2) + _pb_varint(len(value)) + value


def onnx_model(*, external: str | None = None) -> bytes:
    """A minimal ONNX ModelProto (Relu graph with one initializer), encoded by hand."""
    node = _pb(1, b"x") + _pb(2, b"y") + _pb(3, b"relu") + _pb(4, b"Relu")
    tensor = _pb(1, 4) + _pb(2, 1) + _pb(8, b"w")
    if external is None:
        tensor += _pb(9, struct.pack("<4f", 1, 2, 3, 4))
    else:
        tensor += _pb(13, _pb(1, b"location") + _pb(2, external.encode())) + _pb(14, 1)
    graph = _pb(1, node) + _pb(2, b"g") + _pb(5, tensor)
    return _pb(1, 8) + _pb(2, b"shoal-bench") + _pb(7, graph) + _pb(8, _pb(1, b"") + _pb(2, 17))


def hostile_containers(root: Path) -> list[Path]:
    import numpy as np

    made: list[Path] = []

    def put(name: str, data: bytes) -> None:
        p = root / name
        p.write_bytes(data)
        made.append(p)

    evil = pickle.dumps(_Evil(), protocol=2)
    obj_arr = np.empty(2, dtype=object)
    obj_arr[0] = _Evil()
    obj_arr[1] = 3
    buf = io.BytesIO()
    np.save(buf, obj_arr, allow_pickle=True)
    put("object_array.npy", buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, w=np.ones(3), evil=obj_arr)
    put("object_array_in.npz", buf.getvalue())
    put(
        "torch_zip_evil.pt",
        _zip({"archive/data.pkl": evil, "archive/version": b"3\n", "archive/byteorder": b"little"}),
    )
    hidden = _zip({"archive/data.pkl": evil, "archive/version": b"3\n"})
    # picklescan GHSA: encrypted-flag bit set, which torch ignores but zipfile refuses
    flagged = bytearray(hidden)
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        pos = flagged.find(sig)
        while pos >= 0:
            off = 6 if sig == b"PK\x03\x04" else 8
            flagged[pos + off] |= 0x01
            pos = flagged.find(sig, pos + 4)
    put("torch_zip_flagbit.pt", bytes(flagged))
    put("torch_zip_renamed.bin", _zip({"model/data.pkl": evil, "model/data/0": bytes(16)}))
    put(
        "nested_zip.zip",
        _zip(
            {"inner.zip": _zip({"deep/inner2.zip": _zip({"payload.pkl": evil})})},
            method=zipfile.ZIP_DEFLATED,
        ),
    )
    put("joblib_zlib.joblib", zlib.compress(evil))
    put("joblib_gzip.joblib", gzip.compress(evil))
    put("joblib_bz2.joblib", bz2.compress(evil))
    put("joblib_xz.joblib", lzma.compress(evil))
    put("joblib_lzma.joblib", lzma.compress(evil, format=lzma.FORMAT_ALONE))
    put("pickle_then_zip.pt", evil + _zip({"a.npy": b"\x93NUMPY"}))
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as tf:
        info = tarfile.TarInfo("pickle")
        info.size = len(evil)
        tf.addfile(info, io.BytesIO(evil))
    put("legacy_tar.tar", tbuf.getvalue())
    legacy = io.BytesIO()
    for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}):
        pickle.dump(part, legacy, protocol=2)
    legacy.write(evil)
    pickle.dump([], legacy, protocol=2)
    put("torch_legacy_evil.pt", legacy.getvalue())
    put("keras3_lambda.keras", _keras_zip(keras_config([lambda_layer_k3()])))
    fn_ref = {
        "module": "builtins",
        "class_name": "function",
        "config": "exec",
        "registered_name": "function",
    }
    cfg = keras_config([])
    cfg["config"]["layers"][0]["config"]["activation"] = fn_ref
    put("keras3_function_ref.keras", _keras_zip(cfg))
    custom: dict[str, Any] = {
        "module": "os",
        "class_name": "system",
        "config": {},
        "registered_name": None,
    }
    put("keras3_custom_module.keras", _keras_zip(keras_config([custom])))
    write_keras_h5(root / "keras2_lambda.h5", keras2_model_config([lambda_layer_k2()]))
    made.append(root / "keras2_lambda.h5")
    put("model_config.json", json.dumps(keras2_model_config([lambda_layer_k2()])).encode())
    put("onnx_traversal.onnx", onnx_model(external="../../../etc/passwd"))
    return made


# --- benign files ----------------------------------------------------------------------------


def benign(root: Path) -> list[Path]:
    import joblib
    import numpy as np
    from safetensors.numpy import save_file
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    made: list[Path] = []
    x, y = load_digits(return_X_y=True)
    x, y = x[:400], y[:400]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "logreg": LogisticRegression(max_iter=200).fit(x, y),
            "forest": RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y),
            "mlp": MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0).fit(x, y),
            "scaler": StandardScaler().fit(x),
            "pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)).fit(x, y),
        }
    for name, model in models.items():
        for comp in (0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)):
            tag = comp if isinstance(comp, int) else comp[0]
            p = root / f"{name}_c{tag}.joblib"
            joblib.dump(model, p, compress=comp)
            made.append(p)
        for proto in (0, 2, 4, 5):
            p = root / f"{name}_p{proto}.pkl"
            p.write_bytes(pickle.dumps(model, protocol=proto))
            made.append(p)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "w": np.random.default_rng(0).normal(size=(64, 32)),
        "b": np.zeros(32, dtype=np.float32),
    }
    np.save(root / "weights.npy", arrays["w"])
    np.savez(root / "weights.npz", w=arrays["w"], b=arrays["b"])
    np.savez_compressed(root / "weights_compressed.npz", w=arrays["w"], b=arrays["b"])
    save_file(arrays, root / "weights.safetensors")
    made += [
        root / n
        for n in ("weights.npy", "weights.npz", "weights_compressed.npz", "weights.safetensors")
    ]
    (root / "model.onnx").write_bytes(onnx_model())
    (root / "model_external.onnx").write_bytes(onnx_model(external="weights.bin"))
    made += [root / "model.onnx", root / "model_external.onnx"]
    (root / "model.keras").write_bytes(_keras_zip(keras_config([])))
    made.append(root / "model.keras")
    try:
        import h5py  # noqa: F401

        write_keras_h5(root / "model.h5", keras2_model_config([]))
        made.append(root / "model.h5")
    except ImportError:
        pass  # without h5py an HDF5 file cannot be verified, so it is not a fair benign sample
    made += _benign_torch(root)
    made += zero_weights(root)
    return made


def zero_weights(root: Path) -> list[Path]:
    """A 32 MiB all-zero weight as libraries save it compressed: 1,000:1 (deflate) to over
    90,000:1 (bz2), past max_ratio, yet a real model file (a freshly initialised bias, a
    pruned layer) that must not be flagged."""
    import joblib
    import numpy as np

    w = np.zeros(8 << 20, dtype=np.float32)
    made = []
    for codec in ("zlib", "bz2", "xz"):
        p = root / f"zeros_{codec}.joblib"
        joblib.dump({"w": w}, p, compress=(codec, 3))
        made.append(p)
    p = root / "zeros_compressed.npz"
    np.savez_compressed(p, w=w)
    made.append(p)
    return made


def _benign_torch(root: Path) -> list[Path]:
    try:
        import torch
    except ImportError:
        return []
    made = []
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10),
    )
    linear = torch.nn.Linear(16, 4)
    for name, sd in (("linear", linear.state_dict()), ("convnet", net.state_dict())):
        torch.save(sd, root / f"{name}.pt")
        torch.save(sd, root / f"{name}_legacy.pt", _use_new_zipfile_serialization=False)
        made += [root / f"{name}.pt", root / f"{name}_legacy.pt"]
    torch.save(
        {
            "model": net.state_dict(),
            "epoch": 3,
            "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict(),
        },
        root / "checkpoint.pt",
    )
    made.append(root / "checkpoint.pt")
    from safetensors.torch import save_file

    save_file(linear.state_dict(), root / "linear.safetensors")
    made.append(root / "linear.safetensors")
    return made


def big_npy(root: Path, mb: int) -> Path:
    import numpy as np

    p = root / "big.npy"
    np.save(p, np.random.default_rng(1).normal(size=(mb * 2**20 // 8,)))
    return p


def big_pickle(root: Path) -> Path:
    """A large real pickle (a fitted forest, ~20 MB), where scanning means walking opcodes."""
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_digits(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=150, random_state=0).fit(x, y)
    p = root / "forest.pkl"
    p.write_bytes(pickle.dumps(forest, protocol=4))
    return p


def big_torch(root: Path, mb: int) -> Path:
    import torch

    p = root / "big.pt"
    torch.save({"w": torch.randn(mb * 2**20 // 4)}, p)
    return p


def build(root: Path, *, big_mb: int = 0) -> dict[str, list[Path]]:
    """Write the corpus under ``root``: {"hostile": [...], "benign": [...], "big": [...]}."""
    hostile_dir = root / "hostile"
    benign_dir = root / "benign"
    big_dir = root / "big"
    for d in (hostile_dir, benign_dir, big_dir):
        d.mkdir(parents=True, exist_ok=True)
    hostile = []
    for name, data in hostile_pickles().items():
        (hostile_dir / name).write_bytes(data)
        hostile.append(hostile_dir / name)
    hostile += hostile_containers(hostile_dir)
    good = benign(benign_dir)
    big: list[Path] = []
    if big_mb:
        big.append(big_npy(big_dir, big_mb))
        big.append(big_pickle(big_dir))
        with contextlib.suppress(ImportError):
            big.append(big_torch(big_dir, big_mb))
    return {"hostile": hostile, "benign": good, "big": big}


Builder = Callable[[Path], list[Path]]
