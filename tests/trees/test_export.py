"""Model files: XGBoost's JSON format loads in XGBoost and predicts the same; shoal's own
JSON predictor round-trips; hostile files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine, make_regression

from shoal.errors import DataError
from shoal.trees import GBDTParams, train
from shoal.trees.export import load_model, save_model, save_xgboost

CASES = [
    ("logistic", GBDTParams(n_trees=8, max_depth=4)),
    ("softmax", GBDTParams(objective="multi:softprob", num_class=3, n_trees=4, max_depth=3)),
    ("squared", GBDTParams(objective="reg:squarederror", n_trees=5, base_score=1.5)),
]


def _data(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "logistic":
        x, y = load_breast_cancer(return_X_y=True)
    elif kind == "softmax":
        x, y = load_wine(return_X_y=True)
    else:
        x, y = make_regression(300, 5, noise=3.0, random_state=0)
    x = x.copy()
    x[np.random.default_rng(0).random(x.shape) < 0.05] = np.nan
    return x, y


@pytest.mark.parametrize(("kind", "params"), CASES)
def test_xgboost_loads_the_export_and_predicts_the_same(
    tmp_path: Path, kind: str, params: GBDTParams
) -> None:
    xgb = pytest.importorskip("xgboost")
    x, y = _data(kind)
    model = train(x, y, params)
    save_xgboost(model, tmp_path / "model.json")
    theirs = xgb.Booster(model_file=str(tmp_path / "model.json"))
    expected = theirs.predict(xgb.DMatrix(x, missing=np.nan))
    np.testing.assert_allclose(model.predict(x), expected.reshape(model.predict(x).shape),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(("kind", "params"), CASES)
def test_shoal_predictor_file_round_trips(tmp_path: Path, kind: str, params: GBDTParams) -> None:
    x, y = _data(kind)
    model = train(x, y, params)
    save_model(model, tmp_path / "model.json")
    text = (tmp_path / "model.json").read_text()
    assert json.loads(text)["format"] == "shoal.trees/1"
    np.testing.assert_array_equal(load_model(tmp_path / "model.json").predict(x), model.predict(x))


def test_hostile_model_files_are_refused(tmp_path: Path) -> None:
    x, y = _data("logistic")
    save_model(train(x, y, GBDTParams(n_trees=2, max_depth=2)), tmp_path / "m.json")
    good = json.loads((tmp_path / "m.json").read_text())

    def refused(doc: object, match: str) -> None:
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        with pytest.raises(DataError, match=match):
            load_model(tmp_path / "bad.json")

    refused({**good, "format": "pickle"}, "not a shoal tree model")
    loop = json.loads(json.dumps(good))
    loop["trees"][0][0]["left"][0] = 0
    refused(loop, "point forward")
    far = json.loads(json.dumps(good))
    far["trees"][0][0]["feature"][0] = 10**6
    refused(far, "feature out of range")
    unsorted = json.loads(json.dumps(good))
    unsorted["cuts"][0] = [3.0, 1.0]
    refused(unsorted, "increasing")
    refused({**good, "params": {**good["params"], "max_depth": 99}}, "max_depth")
    (tmp_path / "bad.json").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(DataError, match="cannot read"):
        load_model(tmp_path / "bad.json")
