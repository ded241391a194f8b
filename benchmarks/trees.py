"""Gradient-boosted trees: federated quality and speed beside centralized XGBoost hist.

Quality: test AUC of three models trained in the same run with the same parameters
(``--trees`` trees of depth ``--depth``, learning rate 0.3, 256 bins) on the same held-out
20% of rows (the rows SecureBoost's parties hold out): horizontal shoal (``--nodes`` nodes,
Dirichlet(0.5) label skew), vertical shoal (SecureBoost as a guest and a host node: PSI,
sealed routing; the first 10 / 30 columns at the guest, the rest at the host) and XGBoost
``hist`` on the pooled data. Data: breast_cancer, and ``make_classification`` with
``--rows`` rows and 330 columns (30 informative, at the guest; 300 at the host). Vertical
runs Paillier only where rows <= ``--paillier-max-rows`` (with ``--quality-key-bits``: the
protocol is exact, so the key size changes its speed, never its trees); above that the
vertical model is, by the losslessness the tests check tree by tree, centralized shoal on
the joined columns with the guest's and host's cuts in fixed point, and is labelled so.
Likewise horizontal quality uses SecureSum up to ``--secure-max-rows`` rows and the plain
sum above (the trees are bit-identical either way: ``test_horizontal.py`` checks both).
XGBoost is also trained on the bin codes of each federated mode's cuts: what separates a
federated model from XGBoost on raw values is then where the cuts fall, not the protocol.

Horizontal speed: seconds per tree on ``--speed-rows`` x 330 generated rows over
``--nodes`` simulated nodes, with SecureSum and with a plain sum, against XGBoost hist
(``nthread=1``, like the single-threaded simulation) on the pooled rows; the three
alternate for ``--repeats`` repeats of ``--speed-trees`` trees; medians.

Vertical speed: one SecureBoost tree (depth ``--depth``, ``--vertical-bins`` bins, FATE's
default 32) at 30 + 300 columns for each of ``--vertical-rows``, with ``--key-bits``
Paillier (2048 by default), through the routed protocol (guest and host nodes, PSI first,
sealed boxes) simulated in this process, so process CPU seconds are the core-seconds of both
parties (and the coordinator) together. Reported per phase: encryption, host accumulation,
host packing, decryption, split finding; each party's core-seconds (the sum of its
phases); PSI separately (once per job, not per tree); and least-squares lines of
core-seconds per tree against rows (both parties, and each party), extrapolated to 100,000.

    python benchmarks/trees.py --json trees.json
    python benchmarks/trees.py --rows 100000 --secure-max-rows 100000 --skip speed vertical
    python benchmarks/trees.py --skip quality speed --vertical-rows 10000 20000 50000
    python benchmarks/trees.py --rows 100000 --skip horizontal speed vertical
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


def vertical_routed(
    x: np.ndarray, y: np.ndarray, guest_cols: int, params: GBDTParams, key_bits: int,
    test_fraction: float,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """SecureBoost as the guest and one host node (roles, PSI, sealed routing) in this
    process: its CPU seconds are every party's (and the coordinator's) together."""
    from shoal.core.federation import Federation as Fed
    from shoal.runtime.roles import NodeApps
    from shoal.trees.secureboost import SecureBoostConfig, secureboost_tasks, train_routed
    from shoal.vertical.party import PartyData

    ids = [f"{i:09d}" for i in range(len(y))]
    tables = {
        "guest": PartyData.from_columns(ids, x[:, :guest_cols], y=y),
        "host": PartyData.from_columns(ids, x[:, guest_cols:]),
    }
    apps = {}
    for name in tables:
        app = NodeApp(max_kept=8)
        app.install(secureboost_tasks(name))
        apps[name] = app
    engine = LocalEngine(NodeApps(apps), nodes=list(tables), data=list(tables.values()))
    fed = Fed(engine, roles={"guest": ["guest"], "host": ["host"]})
    cfg = SecureBoostConfig(params=params, key_bits=key_bits, insecure_test_keys=key_bits < 2048,
                            test_fraction=test_fraction, seed=0)  # fmt: skip
    result = train_routed(fed, cfg)
    guest = engine.node_state("guest")["shoal.trees.secureboost"]["guest"]
    host = engine.node_state("host")["shoal.trees.secureboost"]["host"]
    stats = {
        "cpu_s": result.cpu_s, "wall_s": result.wall_s, "guest": dict(guest.stats.seconds),
        "host": dict(host.seconds), "routed_bytes": result.routed_bytes,
    }  # fmt: skip
    return result, stats


def test_rows(n: int) -> np.ndarray:
    """The held-out rows of every model: the ones SecureBoost's parties hold out."""
    from shoal.vertical.model import held_out_rows

    return held_out_rows(n, seed=0, test_fraction=0.2)


def quality(name: str, x: np.ndarray, y: np.ndarray, guest_cols: int, args: Any) -> dict[str, Any]:
    from shoal.trees.secureboost import digest

    held = test_rows(len(y))
    x_train, x_test, y_train, y_test = x[~held], x[held], y[~held], y[held]
    params = GBDTParams(n_trees=args.trees, max_depth=args.depth, learning_rate=0.3)
    out: dict[str, Any] = {"data": name, "rows": len(x), "features": x.shape[1]}
    started = time.perf_counter()
    xgb_model = xgboost_model(x_train, y_train, params, nthread=args.xgb_threads)
    out["xgboost_auc"] = float(roc_auc_score(y_test, xgboost_predict(xgb_model, x_test)))
    out["xgboost_s"] = time.perf_counter() - started
    if "horizontal" not in args.skip:
        out.update(horizontal_quality(x_train, y_train, x_test, y_test, params, args))
    guest_bins = fit_bins(x_train[:, :guest_cols], max_bins=params.max_bins)
    host_bins = fit_bins(x_train[:, guest_cols:], max_bins=params.max_bins)
    fixed = GBDTParams(**{**params.to_dict(), "fixed_point_bits": 24})
    joined = Bins(cuts=guest_bins.cuts + host_bins.cuts)
    reference = train(x_train, y_train, fixed, bins=joined)
    reference_scores = reference.predict(x_test)
    out["vertical_reference_auc"] = float(roc_auc_score(y_test, reference_scores))
    # the vertical parties' cuts (XGBoost's rule, each party on its own columns) given to XGBoost
    on_vertical = xgboost_model(codes(joined, x_train), y_train, params, args.xgb_threads)
    out["xgboost_on_vertical_cuts_auc"] = float(
        roc_auc_score(y_test, xgboost_predict(on_vertical, codes(joined, x_test)))
    )
    if len(x) <= args.paillier_max_rows:
        result, stats = vertical_routed(x, y, guest_cols, params, args.quality_key_bits, 0.2)
        out["vertical_auc"] = result.test["auc"]
        out["vertical_paillier"] = {"key_bits": args.quality_key_bits, **stats}
        out["vertical_equals_reference"] = (
            result.test["digest"] == bytes(digest(reference_scores)).hex()
        )
    else:
        out["vertical_auc"] = out["vertical_reference_auc"]
        out["vertical_paillier"] = None  # by losslessness (tests/trees/test_secureboost.py)
    for kind in ("horizontal", "vertical"):
        if f"{kind}_auc" in out:
            out[f"{kind}_gap"] = abs(out[f"{kind}_auc"] - out["xgboost_auc"])
    return out


def horizontal_quality(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    params: GBDTParams,
    args: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.perf_counter()
    secure = len(x_train) + len(x_test) <= args.secure_max_rows
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
    return out


def cut_sensitivity(args: Any) -> list[dict[str, Any]]:
    """How much test AUC moves when only the cuts move: XGBoost on raw values, on the bin
    codes of the vertical parties' cuts (fit_bins), and on the codes of XGBoost's own
    cuts, for each data seed of the generated task (same split as the quality runs)."""
    import xgboost as xgb

    params = GBDTParams(n_trees=args.trees, max_depth=args.depth, learning_rate=0.3)
    out = []
    for seed in args.cut_seeds:
        x, y = generated(args.cut_rows, seed=seed)
        held = test_rows(len(y))
        xtr, xte, ytr, yte = x[~held], x[held], y[~held], y[held]

        def auc(
            train_x: np.ndarray, test_x: np.ndarray, ytr: np.ndarray = ytr, yte: np.ndarray = yte
        ) -> float:
            model = xgboost_model(train_x, ytr, params, nthread=args.xgb_threads)
            return float(roc_auc_score(yte, xgboost_predict(model, test_x)))

        exact = fit_bins(xtr, max_bins=params.max_bins)
        indptr, values = xgb.QuantileDMatrix(xtr, label=ytr, max_bin=256).get_quantile_cut()
        own = Bins(cuts=tuple(  # XGBoost's cuts without its two sentinels
            np.asarray(values[indptr[j] + 1 : indptr[j + 1] - 1], dtype=np.float64)
            for j in range(x.shape[1])
        ))  # fmt: skip
        row = {"rows": args.cut_rows, "seed": seed, "xgboost_auc": auc(xtr, xte),
               "on_vertical_cuts_auc": auc(codes(exact, xtr), codes(exact, xte)),
               "on_own_cuts_auc": auc(codes(own, xtr), codes(own, xte))}  # fmt: skip
        print(json.dumps(row), flush=True)
        out.append(row)
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
        _, stats = vertical_routed(x, y, 30, params, args.key_bits, 0.0)
        # each party's own phases (the protocol's steps run one party at a time, so this
        # process's CPU splits by party; the rest is the coordinator's routing)
        party = {"guest": float(sum(stats["guest"].values())),
                 "host": float(sum(stats["host"].values()))}  # fmt: skip
        out.append({"rows": rows, "features": "30+300", "key_bits": args.key_bits,
                    "bins": args.vertical_bins, **stats, "party_core_s": party})  # fmt: skip
        print(f"  vertical {rows} rows: {stats['cpu_s']['trees']:.1f} core-s per tree "
              f"(PSI {stats['cpu_s']['align']:.1f})", flush=True)  # fmt: skip
    if len(out) >= 2:
        # least squares line of core-seconds per tree against rows, and how far each
        # measured point is from it: linear growth shows as small residuals
        r = np.array([v["rows"] for v in out], dtype=np.float64)
        c = np.array([v["cpu_s"]["trees"] for v in out])
        slope, intercept = np.polyfit(r, c, 1)
        at_100k = slope * 100_000 + intercept
        fate = FATE_SECONDS_PER_TREE * FATE_CORES_PER_PARTY * 2
        per_party = {}
        for name in ("guest", "host"):
            pc = np.array([v["party_core_s"][name] for v in out])
            ps, pi = np.polyfit(r, pc, 1)
            per_party[name] = {
                "core_s_per_row": float(ps),
                "intercept_core_s": float(pi),
                "extrapolated_core_s_at_100k": float(ps * 100_000 + pi),
                "fraction_of_fate_party": float((ps * 100_000 + pi) / (fate / 2)),
            }
        out.append({"fit": {"core_s_per_row": float(slope), "intercept_core_s": float(intercept),
                            "residuals_core_s": (c - (slope * r + intercept)).tolist(),
                            "extrapolated_core_s_at_100k": float(at_100k),
                            "fate_core_s_per_tree_both_parties": fate,
                            "fraction_of_fate": float(at_100k / fate),
                            "per_party": per_party}})  # fmt: skip
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
    parser.add_argument("--cut-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--cut-rows", type=int, default=20_000)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["quality", "horizontal", "speed", "vertical"],
        help="parts not to run: horizontal skips the horizontal model of the quality part",
    )
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
    if args.cut_seeds:
        result["cut_sensitivity"] = cut_sensitivity(args)
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
        horizontal = (
            f"horizontal {q['horizontal_auc']:.4f} (gap {q['horizontal_gap']:.4f}; XGBoost on "
            f"its cuts {q['xgboost_on_federated_cuts_auc']:.4f})"
            if "horizontal_auc" in q
            else "horizontal skipped"
        )
        print(f"{q['data']:>24}: AUC xgboost {q['xgboost_auc']:.4f} | {horizontal} | vertical "
              f"{q['vertical_auc']:.4f} (gap {q['vertical_gap']:.4f}, {via}; XGBoost on its "
              f"cuts {q['xgboost_on_vertical_cuts_auc']:.4f})")  # fmt: skip
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
            print(f"vertical, line through the points: {f['core_s_per_row'] * 1000:.2f} core-ms "
                  f"per row + {f['intercept_core_s']:.0f} core-s (residuals "
                  f"{', '.join(f'{x:+.0f}' for x in f['residuals_core_s'])}); at 100k rows "
                  f"~{f['extrapolated_core_s_at_100k']:.0f} core-s/tree = "
                  f"{f['fraction_of_fate']:.2f} of FATE's "
                  f"{f['fate_core_s_per_tree_both_parties']:.0f}")  # fmt: skip
            for name, pf in f["per_party"].items():
                print(f"  {name}: ~{pf['extrapolated_core_s_at_100k']:.0f} core-s/tree at 100k "
                      f"= {pf['fraction_of_fate_party']:.2f} of FATE's "
                      f"{f['fate_core_s_per_tree_both_parties'] / 2:.0f} per party "
                      "(target <= 0.33)")  # fmt: skip
            continue
        g, hs, cpu = v["guest"], v["host"], v["cpu_s"]
        print(f"vertical {v['rows']} rows, {v['key_bits']}-bit: {v['wall_s']['trees']:.1f} s, "
              f"{cpu['trees']:.1f} core-s per tree (PSI {cpu['align']:.1f}); encrypt "
              f"{g['encrypt']:.1f}, host accumulate {hs['accumulate']:.1f}, host pack "
              f"{hs['pack']:.1f}, decrypt {g['decrypt']:.1f}, split {g['split']:.1f}; "
              f"guest {v['party_core_s']['guest']:.1f}, host {v['party_core_s']['host']:.1f} "
              "core-s")  # fmt: skip


if __name__ == "__main__":
    main()
