"""``shoal export RUN_ID``: a run's trained model as ONNX, a NumPy predictor or a hub folder.

The model is rebuilt from the job the run recorded (its data is read again for the input
and class counts, and for the checks), the latest checkpoint's weights are loaded, and the
export is checked against the model before the command reports success.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from shoal.cli.options import default_store_path, open_store
from shoal.errors import ConfigError, StoreError

FORMATS = ("onnx", "numpy", "hub")
_CHECK_ROWS = 512  # test examples each export is compared on

EPILOG = """\
examples:
  shoal export RUN_ID --format onnx                 RUN_ID.onnx, checked with onnxruntime
  shoal export RUN_ID --format numpy --int8         a NumPy-only predictor, int8 weights
  shoal export RUN_ID --format hub --out my-model   a folder for huggingface-cli upload
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a run's model: ONNX, a NumPy-only predictor, or a model-hub folder",
        description="Export the latest checkpoint of RUN_ID, checked against the model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_id", metavar="RUN_ID", help="the run (see `shoal runs`)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="what to write")
    parser.add_argument(
        "--out", help="file (onnx, numpy) or folder (hub); default: named after the run"
    )
    parser.add_argument("--store", help=f"store file (default {default_store_path()})")
    parser.add_argument("--round", type=int, help="export this round's checkpoint (default: last)")
    parser.add_argument(
        "--int8", action="store_true", help="numpy: store weight matrices as int8 (4x smaller)"
    )
    parser.add_argument(
        "--data-dir",
        default=".",
        help="folder the run's job paths are relative to (default: the current one)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_export)


def _default_out(run_id: str, fmt: str, int8: bool) -> str:
    if fmt == "onnx":
        return f"{run_id}.onnx"
    if fmt == "numpy":
        return f"{run_id}{'.int8' if int8 else ''}.predictor.safetensors"
    return f"{run_id}-hub"


def _export(args: argparse.Namespace) -> int:
    from shoal.cli.job import parse_job
    from shoal.learn.algorithms import ServerState

    if args.int8 and args.format != "numpy":
        raise ConfigError("--int8 applies to --format numpy")
    with open_store(args.store, create=False) as store:
        try:
            run = store.get_run(args.run_id)
        except StoreError:
            raise ConfigError(
                f"no run {args.run_id!r} in store {store.path}; list them with `shoal runs`"
            ) from None
        try:
            checkpoint = store.load_checkpoint(args.run_id, args.round)
        except StoreError as exc:
            raise ConfigError(
                f"run {args.run_id!r} ({run.status}) has no checkpoint to export: {exc}. A run "
                "records one after each completed round; finish or resume it first"
            ) from None
        rounds = store.round_metrics(args.run_id)
    try:
        job = parse_job(run.config, base_dir=Path(args.data_dir))
    except ConfigError as exc:
        raise ConfigError(
            f"run {args.run_id!r} was not recorded from a job shoal can rebuild: {exc}"
        ) from None
    if job.model["name"] not in _exportable():
        raise ConfigError(
            f"model {job.model['name']!r} cannot be exported; export handles "
            f"{', '.join(sorted(_exportable()))}"
        )
    train, test = job.load_data()
    features = int(train.x.reshape(len(train.x), -1).shape[1])
    classes = int(train.classes or 2)
    model = job.build_model(features=features, classes=classes)
    state = ServerState.from_arrays(checkpoint.round, checkpoint.arrays, checkpoint.state)
    model.set_weights(state.weights)
    from shoal.learn.export.convert import base_model

    whole = base_model(model)  # refuses a model with personal layers, before any file
    sample_x, sample_y = test.x[:_CHECK_ROWS], test.y[:_CHECK_ROWS]
    out = args.out or _default_out(args.run_id, args.format, args.int8)
    report: dict[str, Any] = {
        "run_id": args.run_id,
        "round": checkpoint.round,
        "format": args.format,
        "out": out,
        "parameters": int(sum(v.size for v in whole.get_weights().values())),
        # what the Store holds: the federated weights only, when a backbone was frozen
        "checkpoint_bytes": int(sum(v.nbytes for v in state.weights.values())),
    }
    if args.format == "onnx":
        report.update(_onnx(model, out, sample_x))
    elif args.format == "numpy":
        report.update(_numpy(model, out, sample_x, sample_y, int8=args.int8, run_id=args.run_id))
    else:
        report.update(_hub(model, out, job, run, checkpoint.round, rounds, features, classes))
    _print(report, as_json=args.json)
    return 0


def _exportable() -> set[str]:
    from shoal.learn.registry import model_names

    return {n for n in model_names() if not n.startswith("sklearn_")}


def _onnx(model: Any, out: str, x: Any) -> dict[str, Any]:
    from shoal.learn.export import check_onnx, export_onnx

    export_onnx(model, out, sample=x)
    try:
        check = check_onnx(out, model, x)
    except BaseException:
        os.unlink(out)  # an unchecked file is not an export
        raise
    if not check.ok:
        os.unlink(out)
        raise ConfigError(
            f"the ONNX file disagrees with the model (max probability difference "
            f"{check.max_prob_diff:.2e}, same predictions: {check.same_predictions}); "
            "nothing was written"
        )
    return {
        "bytes": os.path.getsize(out),
        "checked_examples": check.examples,
        "max_logit_diff": check.max_logit_diff,
        "max_prob_diff": check.max_prob_diff,
    }


def _numpy(model: Any, out: str, x: Any, y: Any, *, int8: bool, run_id: str) -> dict[str, Any]:
    import numpy as np

    from shoal.learn.export import NumpyPredictor, model_logits, write_predictor

    write_predictor(out, model, int8=int8, info={"run_id": run_id})
    try:
        predictor = NumpyPredictor.load(out)
        got = predictor.logits(x)
    except BaseException:
        os.unlink(out)  # an unchecked file is not an export
        raise
    want = model_logits(model, x)
    accuracy = float((want.argmax(axis=1) == y).mean())
    result = {
        "bytes": os.path.getsize(out),
        "checked_examples": len(x),
        "max_logit_diff": float(np.abs(got - want).max()),
        "accuracy_model": accuracy,
        "accuracy_predictor": float((got.argmax(axis=1) == y).mean()),
    }
    if int8:
        result["accuracy_cost_int8"] = result["accuracy_model"] - result["accuracy_predictor"]
    return result


def _hub(
    model: Any,
    out: str,
    job: Any,
    run: Any,
    round_num: int,
    rounds: list[Any],
    features: int,
    classes: int,
) -> dict[str, Any]:
    from shoal.cli.job import TEXT_DATASETS
    from shoal.learn.export import TrainingRecord, write_hub

    final: dict[str, Any] = next((r.metrics for r in reversed(rounds) if r.round == round_num), {})
    record = TrainingRecord(
        run_id=run.id,
        name=run.name,
        status=run.status,
        data=job.data,
        partition=job.partition,
        model=job.model,
        algorithm=_algorithm_settings(job),
        aggregate=job.aggregate,
        privacy=job.privacy,
        rounds_completed=round_num,
        final=final,
        history=[r.metrics for r in rounds],
        transfer=job.transfer.to_dict() if job.transfer is not None else None,
    )
    options = {k: v for k, v in job.model.items() if k != "name"}
    extra: dict[str, Any] = {}
    if job.data["dataset"] in TEXT_DATASETS:  # the ids mean these tokens, in this order
        corpus = job.text_corpus()
        extra = {"vocab": list(corpus.vocab), "tokens": corpus.tokens, "seq_len": corpus.seq_len}
    sizes = write_hub(
        out,
        model=model,
        name=str(job.model["name"]),
        options=options,
        features=features,
        classes=classes,
        record=record,
        extra=extra,
    )
    return {"bytes": sum(sizes.values()), "files": sizes}


def _algorithm_settings(job: Any) -> dict[str, Any]:
    """Every setting of the run's algorithm, defaults included (the job lists only some)."""
    import dataclasses

    algorithm = job.build_algorithm()
    skip = {"aggregator", "privacy", "plan"}
    values = {
        f.name: getattr(algorithm, f.name)
        for f in dataclasses.fields(algorithm)
        if f.init and f.name not in skip
    }
    return {"name": algorithm.name, **values}


def _print(report: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"exported run {report['run_id']} round {report['round']} as {report['format']}: "
        f"{report['out']}"
    )
    for key, value in report.items():
        if key in ("run_id", "round", "format", "out"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:,} B" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.3g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"  {key:<20} {value}", file=sys.stdout)
