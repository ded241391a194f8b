"""Red team: hostile predictor files, hostile hub folders and pretrained weights.

Each case was a crash (a RecursionError, OverflowError, TypeError or a torch RuntimeError
escaping) or a read outside the folder before the fix; each must now be a ShoalError
naming what was wrong, and nothing may run code from a file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.errors import ConfigError, UnsafeModelError
from shoal.learn.export.predictor import FORMAT, NumpyPredictor, PredictorError, read_safetensors

DEEP = "[" * 100_000 + "]" * 100_000


def safetensors_file(path: Path, header: Any, data: bytes = b"", raw: bytes | None = None) -> Path:
    blob = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


W = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}


def predictor_file(path: Path, meta: dict[str, str], header: Any = None, data: bytes = b"") -> Path:
    return safetensors_file(
        path, {**(header or {}), "__metadata__": {"format": FORMAT, **meta}}, data
    )


@pytest.mark.parametrize(
    ("header", "raw", "match"),
    [
        (None, DEEP.encode(), "nested too deeply"),
        # int64 product of the shape wraps to 0 and matched the 0 bytes given
        ({"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, None, "bytes"),
        ({"a": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 0]}}, None, "bytes"),
        ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, None, "malformed"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, None, "malformed"),
        (
            None,
            b'{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',
            "malformed",
        ),
    ],
)
def test_a_lying_predictor_header_is_a_predictor_error(
    tmp_path: Path, header: Any, raw: bytes | None, match: str
) -> None:
    path = safetensors_file(tmp_path / "p.safetensors", header, b"\0" * 4, raw)
    with pytest.raises(PredictorError, match=match):
        read_safetensors(path)


@pytest.mark.parametrize(
    ("meta", "header", "data", "match"),
    [
        ({"program": "[]", "input_dtype": "bogus"}, None, b"", "input dtype 'bogus'"),
        ({"program": "[]", "input_dtype": "O"}, None, b"", "input dtype 'O'"),
        ({"program": DEEP}, None, b"", "program is nested too deeply"),
        ({"program": "[]", "info": DEEP}, None, b"", "info is nested too deeply"),
        (
            {"program": json.dumps([{"op": "linear", "weight": ["w"]}])},
            W,
            bytes(24),
            "name a tensor",
        ),
        (
            {"program": json.dumps([{"op": "lstm", "layers": "abc"}])},
            W,
            bytes(24),
            "non-empty list",
        ),
        (
            {"program": json.dumps([{"op": "lstm", "layers": [{"w_ih": "w"}]}])},
            W,
            bytes(24),
            "w_hh",
        ),
        (
            {"program": json.dumps([{"op": "linear", "weight": "w", "bias": "w"}])},
            W,
            bytes(24),
            "not a non-empty 1-d",
        ),
        (
            {"program": json.dumps([{"op": "embedding", "weight": "s"}]), "input_dtype": "int64"},
            {"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
            bytes(4),
            "not a non-empty 2-d",
        ),
        (
            {"program": "[]"},
            {
                "q": {"dtype": "I8", "shape": [2, 2], "data_offsets": [0, 4]},
                "q.scale": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]},
            },
            bytes(16),
            "one scale per row",
        ),
    ],
)
def test_a_hostile_predictor_program_is_refused_at_load(
    tmp_path: Path, meta: dict[str, str], header: Any, data: bytes, match: str
) -> None:
    path = predictor_file(tmp_path / "p.safetensors", meta, header, data)
    with pytest.raises(PredictorError, match=match):
        NumpyPredictor.load(path)


def test_input_of_the_wrong_shape_is_a_predictor_error_naming_the_layer(tmp_path: Path) -> None:
    program = json.dumps([{"op": "linear", "weight": "w"}])
    predictor = NumpyPredictor.load(
        predictor_file(tmp_path / "p", {"program": program}, W, bytes(24))
    )
    assert predictor.predict(np.zeros((4, 3))).shape == (4,)
    with pytest.raises(PredictorError, match=r"layer 0 \('linear'\).*\(1, 5\)"):
        predictor.predict(np.zeros((1, 5)))
    with pytest.raises(PredictorError, match="layer 0"):
        predictor.predict(np.zeros(()))


# ------------------------------------------------------------------ pretrained folders


def hub_folder(path: Path, **config: Any) -> Path:
    from safetensors.numpy import save_file

    path.mkdir()
    base = {"format": "shoal.hub/1", "shoal_model": "mlp", "shoal_options": {"hidden": 4}}
    (path / "config.json").write_text(json.dumps({**base, "features": 4, "classes": 3, **config}))
    save_file({"x": np.zeros(2, np.float32)}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"features": -1}, "'features' must be in"),
        ({"classes": 0}, "'classes' must be in"),
        ({"features": True}, "'features' must be"),
        ({"shoal_options": {"hidden": 10**12}}, "does not build a model"),  # torch alloc error
    ],
)
@pytest.mark.torch
def test_a_hostile_hub_config_is_a_config_error(
    tmp_path: Path, config: dict[str, Any], match: str
) -> None:
    pytest.importorskip("torch")
    from shoal.learn.export import load_pretrained

    with pytest.raises(ConfigError, match=match):
        load_pretrained(hub_folder(tmp_path / "h", **config))


@pytest.mark.torch
def test_a_deeply_nested_hub_config_is_a_config_error(tmp_path: Path) -> None:
    from shoal.learn.export import load_pretrained

    folder = hub_folder(tmp_path / "h")
    (folder / "config.json").write_text(DEEP)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_pretrained(folder)


@pytest.mark.torch
def test_links_out_of_a_model_folder_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from shoal.learn.export import load_pretrained
    from shoal.learn.transfer import read_weights

    secret = tmp_path / "secret.safetensors"
    save_file({"x": np.ones(2, np.float32)}, str(secret))
    folder = hub_folder(tmp_path / "h")
    (folder / "model.safetensors").unlink()
    os.symlink(secret, folder / "model.safetensors")
    for load in (read_weights, load_pretrained):
        with pytest.raises(UnsafeModelError, match="outside the model folder"):
            load(folder)
    other = hub_folder(tmp_path / "g")
    (other / "config.json").unlink()
    os.symlink(secret, other / "config.json")
    with pytest.raises(UnsafeModelError, match="outside the model folder"):
        load_pretrained(other)
    inner = hub_folder(tmp_path / "k")  # a link that stays inside the folder is fine
    (inner / "model.safetensors").rename(inner / "weights.safetensors")
    os.symlink("weights.safetensors", inner / "model.safetensors")
    assert set(read_weights(inner)) == {"x"}


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_safetensors_in_dtypes_numpy_lacks_load_as_float32(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from shoal.learn.transfer import read_weights

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([1.0, -2.0]).to(getattr(torch, dtype))}, str(path))
    weights = read_weights(path)
    assert weights["w"].dtype == np.float32
    np.testing.assert_array_equal(weights["w"], [1.0, -2.0])


# ------------------------------------------------------------------ where exports write


def _record() -> Any:
    from shoal.learn.export import TrainingRecord

    return TrainingRecord(
        run_id="r",
        name="n",
        status="finished",
        data={},
        partition={},
        model={"name": "softmax_regression"},
        algorithm={},
        aggregate={},
        privacy=None,
        rounds_completed=1,
        final={},
    )


def test_hub_and_predictor_outs_that_cannot_be_written_are_config_errors(tmp_path: Path) -> None:
    from shoal.learn import SoftmaxRegression
    from shoal.learn.export import write_hub, write_predictor

    model = SoftmaxRegression(features=4, classes=3)

    def hub(out: Path) -> Any:
        return write_hub(
            out,
            model=model,
            name="softmax_regression",
            options={},
            features=4,
            classes=3,
            record=_record(),
        )

    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "file").write_text("x")
    for out in ("link", "dangling"):
        with pytest.raises(ConfigError, match="symbolic link"):
            hub(tmp_path / out)
    with pytest.raises(ConfigError, match="cannot create the folder"):
        hub(tmp_path / "file" / "sub")
    with pytest.raises(ConfigError, match="is a folder"):
        write_predictor(tmp_path / "empty", model)
    with pytest.raises(ConfigError, match="cannot write"):
        write_predictor(tmp_path / "file" / "p", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "empty", "file", "link"]
    assert not any((tmp_path / "empty").iterdir())


def test_a_predictor_write_that_fails_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    from shoal.learn import SoftmaxRegression
    from shoal.learn.export import write_predictor

    def half(tensors: Any, path: str, metadata: Any = None) -> None:
        Path(path).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half)
    with pytest.raises(OSError, match="No space"):
        write_predictor(tmp_path / "p.safetensors", SoftmaxRegression(features=4, classes=3))
    assert list(tmp_path.iterdir()) == []
