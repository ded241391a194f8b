"""Gradient-boosted trees: federated quality and speed beside centralized XGBoost hist.

Quality: test AUC of three models trained in the same run with the same parameters
(``--trees`` trees of depth ``--depth``, learning rate 0.3, 256 bins): horizontal shoal
(``--nodes`` nodes, Dirichlet(0.5) label skew, histograms through SecureSum), vertical shoal
(SecureBoost, the first 10 / 30 columns at the guest, the rest at one host) and XGBoost
``hist`` on the pooled data. Data: breast_cancer, and ``make_classification`` with
``--rows`` rows and 330 columns (30 informative, at the guest; 300 at the host). Vertical
runs Paillier only where rows <= ``--paillier-max-rows`` (with ``--quality-key-bits``: the
protocol is exact, so the key size changes its speed, never its trees); above that the
vertical model is, by the losslessness the tests check tree by tree, centralized shoal on
the joined columns with the guest's and host's cuts in fixed point, and is labelled so.
Likewise horizontal quality uses SecureSum up to ``--secure-max-rows`` rows and the plain
sum above (the trees are bit-identical either way: ``test_horizontal.py`` checks both).

Horizontal speed: seconds per tree on ``--speed-rows`` x 330 generated rows over
``--nodes`` simulated nodes, with SecureSum and with a plain sum, against XGBoost hist
(``nthread=1``, like the single-threaded simulation) on the pooled rows; the three
alternate for ``--repeats`` repeats of ``--speed-trees`` trees; medians.

Vertical speed: one SecureBoost tree (depth ``--depth``, ``--vertical-bins`` bins, FATE's
default 32) at 30 + 300 columns for each of ``--vertical-rows``, with ``--key-bits``
Paillier (2048 by default). Guest and host run in this process one after another, so
process CPU seconds are the core-seconds of both parties together. Reported per phase:
encryption, host accumulation, host packing, decryption, split finding.

    python benchmarks/trees.py --json trees.json
    python benchmarks/trees.py --rows 100000 --vertical-rows 1000 2000 4000 --json trees.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer, make_classification
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.data import Dataset, partition
from shoal.runtime import LocalEngine, NodeApp
from shoal.trees import MISSING, Bins, GBDTParams, fit_bins, train
from shoal.trees.horizontal import horizontal_tasks, train_horizontal

FATE_SECONDS_PER_TREE = 131.0  # FATE 2.2, 100k x (30 + 300), 16 cores per party (issue 19)
FATE_CORES_PER_PARTY = 16


@dataclass(frozen=True)
class Rows:
    x: np.ndarray
    y: np.ndarray


def generated(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """330 columns: 30 informative first (the guest's), 300 noise (the host's)."""
    x, y = make_classification(
        n_samples=rows, n_features=330, n_informative=30, n_redundant=0, n_repeated=0,
        shuffle=False, random_state=seed, flip_y=0.05,
    )  # fmt: skip
    return x, y


def federation(
    x: np.ndarray, y: np.ndarray, nodes: int, seed: int, *, secure: bool = True
) -> Federation:
    parts = partition(
        Dataset(x=x, y=y.astype(np.int64), classes=2),
        nodes=nodes, scheme="dirichlet", alpha=0.5, seed=seed, min_size=10,
    )  # fmt: skip
    app = NodeApp()
    app.install(horizontal_tasks(secure=secure))
    app.install(SecureSum().node_tasks())
    return Federation(LocalEngine(app, data=[Rows(p.x, p.y) for p in parts]), seed=seed)


def xgboost_model(x: np.ndarray, y: np.ndarray, params: GBDTParams, nthread: int = 1) -> Any:
    import xgboost as xgb

    xp = {
        "tree_method": "hist", "max_bin": params.max_bins, "eta": params.learning_rate,
        "max_depth": params.max_depth, "reg_lambda": params.reg_lambda,
        "objective": "binary:logistic", "base_score": 0.5, "nthread": nthread,
    }  # fmt: skip
    return xgb.train(xp, xgb.DMatrix(x, label=y), num_boost_round=params.n_trees)


def codes(bins: Bins, x: np.ndarray) -> np.ndarray:
    """Bin codes as XGBoost input (NaN where missing): its cuts then equal ``bins``."""
    out = bins.transform(x).astype(np.float32)
    out[out == MISSING] = np.nan
    return out


def xgboost_predict(model: Any, x: np.ndarray) -> np.ndarray:
    import xgboost as xgb

    out: np.ndarray = model.predict(xgb.DMatrix(x))
    return out


def vertical_paillier(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray, guest_cols: int, params: GBDTParams,
    key_bits: int,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    from shoal.trees.vertical import GuestParty, HostParty, predict_vertical, train_secureboost

    host = HostParty(x=x[:, guest_cols:], max_bins=params.max_bins, insecure_keys=key_bits < 2048)
    guest = GuestParty(x=x[:, :guest_cols], y=y, params=params, key_bits=key_bits,
                       insecure_keys=key_bits < 2048)  # fmt: skip
    cpu, wall = time.process_time(), time.perf_counter()
    model = train_secureboost(guest, [host.handle])
    stats = {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "guest": dict(guest.stats.seconds),
        "host": dict(host.seconds),
    }
    scores = predict_vertical(model, x_test[:, :guest_cols], [host.handle],
                              x_hosts=[x_test[:, guest_cols:]])  # fmt: skip
    return scores, stats


def quality(name: str, x: np.ndarray, y: np.ndarray, guest_cols: int, args: Any) -> dict[str, Any]:
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    params = GBDTParams(n_trees=args.trees, max_depth=args.depth, learning_rate=0.3)
    out: dict[str, Any] = {"data": name, "rows": len(x), "features": x.shape[1]}
    started = time.perf_counter()
    xgb_model = xgboost_model(x_train, y_train, params, nthread=args.xgb_threads)
    out["xgboost_auc"] = float(roc_auc_score(y_test, xgboost_predict(xgb_model, x_test)))
    out["xgboost_s"] = time.perf_counter() - started
    started = time.perf_counter()
    secure = len(x) <= args.secure_max_rows
    fed = federation(x_train, y_train, args.nodes, seed=0, secure=secure)
    horizontal = train_horizontal(fed, params, secure=secure)
    out["horizontal_secure"] = secure
    out["horizontal_auc"] = float(roc_auc_score(y_test, horizontal.predict(x_test)))
    out["horizontal_s"] = time.perf_counter() - started
    # XGBoost on the bin codes of the federated cuts: the same cuts, so any gap left
    # between it and XGBoost on raw values comes from where the cuts fall, not the protocol
    on_codes = xgboost_model(codes(horizontal.bins, x_train), y_train, params, args.xgb_threads)
    out["xgboost_on_federated_cuts_auc"] = float(
        roc_auc_score(y_test, xgboost_predict(on_codes, codes(horizontal.bins, x_test)))
    )
    guest_bins = fit_bins(x_train[:, :guest_cols], max_bins=params.max_bins)
    host_bins = fit_bins(x_train[:, guest_cols:], max_bins=params.max_bins)
    fixed = GBDTParams(**{**params.to_dict(), "fixed_point_bits": 24})
    joined = Bins(cuts=guest_bins.cuts + host_bins.cuts)
    reference = train(x_train, y_train, fixed, bins=joined)
    out["vertical_reference_auc"] = float(roc_auc_score(y_test, reference.predict(x_test)))
    if len(x) <= args.paillier_max_rows:
        scores, stats = vertical_paillier(
            x_train, y_train, x_test, guest_cols, params, args.quality_key_bits
        )
        out["vertical_auc"] = float(roc_auc_score(y_test, scores))
        out["vertical_paillier"] = {"key_bits": args.quality_key_bits, **stats}
        out["vertical_equals_reference"] = bool(np.array_equal(scores, reference.predict(x_test)))
    else:
        out["vertical_auc"] = out["vertical_reference_auc"]
        out["vertical_paillier"] = None  # by losslessness (tests/trees/test_vertical.py)
    for kind in ("horizontal", "vertical"):
        out[f"{kind}_gap"] = abs(out[f"{kind}_auc"] - out["xgboost_auc"])
    return out


def horizontal_speed(args: Any) -> dict[str, Any]:
    x, y = generated(args.speed_rows, seed=1)
    params = GBDTParams(n_trees=args.speed_trees, max_depth=args.depth, learning_rate=0.3)
    feds = {kind: federation(x, y, args.nodes, seed=1, secure=kind == "secure")
            for kind in ("plain", "secure")}  # fmt: skip
    bins = train_horizontal(feds["secure"], GBDTParams(n_trees=1, max_depth=1)).bins
    times: dict[str, list[float]] = {"xgboost": [], "plain": [], "secure": []}
    for _ in range(args.repeats):  # interleaved
        started = time.perf_counter()
        xgboost_model(x, y, params, nthread=args.xgb_threads)
        times["xgboost"].append((time.perf_counter() - started) / params.n_trees)
        for kind in ("plain", "secure"):
            started = time.perf_counter()
            train_horizontal(feds[kind], params, secure=kind == "secure", bins=bins)
            times[kind].append((time.perf_counter() - started) / params.n_trees)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rows": args.speed_rows, "features": 330, "nodes": args.nodes,
        "trees_per_repeat": params.n_trees, "repeats": args.repeats,
        "seconds_per_tree": med, "all": times,
        "ratio_plain": med["plain"] / med["xgboost"],
        "ratio_secure": med["secure"] / med["xgboost"],
    }  # fmt: skip


def vertical_speed(args: Any) -> list[dict[str, Any]]:
    out = []
    for rows in args.vertical_rows:
        x, y = generated(rows, seed=2)
        params = GBDTParams(n_trees=1, max_depth=args.depth, max_bins=args.vertical_bins)
        _, stats = vertical_paillier(x, y, x[:10], 30, params, args.key_bits)
        out.append({"rows": rows, "features": "30+300", "key_bits": args.key_bits,
                    "bins": args.vertical_bins, **stats})  # fmt: skip
        print(f"  vertical {rows} rows: {stats['cpu_s']:.1f} core-s", flush=True)
    if len(out) >= 2:
        # encryption and accumulation grow with the rows; packing, decryption and split
        # finding level off (a node has at most features x bins candidates): extrapolate
        # the first linearly from the last two sizes, keep the second at the largest size
        last, before = out[-1], out[-2]

        def linear(r: dict[str, Any]) -> float:
            return float(r["guest"]["encrypt"] + r["host"]["accumulate"])

        per_row = (linear(last) - linear(before)) / (last["rows"] - before["rows"])
        flat = last["cpu_s"] - linear(last)
        modelled = flat + linear(last) + per_row * (100_000 - last["rows"])
        straight = last["cpu_s"] + (last["cpu_s"] - before["cpu_s"]) / (
            last["rows"] - before["rows"]
        ) * (100_000 - last["rows"])
        fate = FATE_SECONDS_PER_TREE * FATE_CORES_PER_PARTY * 2
        out.append({"fit": {"linear_core_s_per_row": per_row, "level_core_s": flat,
                            "extrapolated_core_s_at_100k": modelled,
                            "straight_line_core_s_at_100k": straight,
                            "fate_core_s_per_tree_both_parties": fate,
                            "fraction_of_fate": modelled / fate,
                            "fraction_of_fate_straight_line": straight / fate}})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=50)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--paillier-max-rows", type=int, default=1000)
    parser.add_argument("--secure-max-rows", type=int, default=5000)
    parser.add_argument("--quality-key-bits", type=int, default=512)
    parser.add_argument("--speed-rows", type=int, default=20_000)
    parser.add_argument("--speed-trees", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vertical-rows", type=int, nargs="*", default=[500, 2000, 4000, 8000])
    parser.add_argument("--vertical-bins", type=int, default=32)
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--xgb-threads", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["quality", "speed", "vertical"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result: dict[str, Any] = {"args": vars(args)}
    if "quality" not in args.skip:
        x, y = load_breast_cancer(return_X_y=True)
        result["quality"] = [quality("breast_cancer", x, y, 10, args)]
        print(json.dumps(result["quality"][-1], default=str), flush=True)
        x, y = generated(args.rows)
        result["quality"].append(quality(f"generated {args.rows}x330", x, y, 30, args))
        print(json.dumps(result["quality"][-1], default=str), flush=True)
    if "speed" not in args.skip:
        result["horizontal_speed"] = horizontal_speed(args)
    if "vertical" not in args.skip:
        result["vertical_speed"] = vertical_speed(args)
    print_tables(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)


def print_tables(result: dict[str, Any]) -> None:
    for q in result.get("quality", []):
        via = "Paillier" if q["vertical_paillier"] else "lossless reference"
        print(f"{q['data']:>24}: AUC xgboost {q['xgboost_auc']:.4f} (on the federated cuts "
              f"{q['xgboost_on_federated_cuts_auc']:.4f}) | horizontal "
              f"{q['horizontal_auc']:.4f} (gap {q['horizontal_gap']:.4f}) | vertical "
              f"{q['vertical_auc']:.4f} (gap {q['vertical_gap']:.4f}, {via})")  # fmt: skip
    h = result.get("horizontal_speed")
    if h:
        s = h["seconds_per_tree"]
        print(f"horizontal {h['rows']}x330 over {h['nodes']} nodes, s/tree (median of "
              f"{h['repeats']}): xgboost {s['xgboost']:.3f}, shoal plain {s['plain']:.3f} "
              f"({h['ratio_plain']:.1f}x), shoal SecureSum {s['secure']:.3f} "
              f"({h['ratio_secure']:.1f}x)")  # fmt: skip
    for v in result.get("vertical_speed", []):
        if "fit" in v:
            f = v["fit"]
            fate = f["fate_core_s_per_tree_both_parties"]
            print(f"vertical, extrapolated to 100k rows: ~{f['extrapolated_core_s_at_100k']:.0f} "
                  f"core-s/tree ({f['straight_line_core_s_at_100k']:.0f} by a straight line) = "
                  f"{f['fraction_of_fate']:.2f} ({f['fraction_of_fate_straight_line']:.2f}) of "
                  f"FATE's {fate:.0f}")  # fmt: skip
            continue
        g, hs = v["guest"], v["host"]
        print(f"vertical {v['rows']} rows, {v['key_bits']}-bit: {v['wall_s']:.1f} s, "
              f"{v['cpu_s']:.1f} core-s; encrypt {g['encrypt']:.1f}, host accumulate "
              f"{hs['accumulate']:.1f}, host pack {hs['pack']:.1f}, decrypt {g['decrypt']:.1f}, "
              f"split {g['split']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
