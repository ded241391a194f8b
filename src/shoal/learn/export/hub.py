"""A model folder a hub (Hugging Face, or any that takes safetensors + config + card) accepts.

``model.safetensors`` (float32 weights by their state-dict names), ``config.json`` (which
shoal model, its options, input and output sizes) and ``README.md`` (the model card, see
:mod:`shoal.learn.export.card`). :func:`load_pretrained` reads such a folder back, scanning
the weights first. Nothing here touches the network: upload with ``huggingface-cli upload``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import ConfigError, ShoalError
from shoal.learn.export.card import TrainingRecord, render_card
from shoal.learn.export.convert import base_model, input_dtype
from shoal.learn.model import Model

__all__ = ["CONFIG_FORMAT", "load_pretrained", "read_config", "write_hub"]

CONFIG_FORMAT = "shoal.hub/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
_MAX_CONFIG = 2**20
_MAX_SIZE = 2**31  # features, classes: beyond this a config is hostile, not a model


def write_hub(
    out: str | os.PathLike[str],
    *,
    model: Model,
    name: str,
    options: Mapping[str, Any],
    features: int,
    classes: int,
    record: TrainingRecord,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Write the folder ``out`` (which must not exist, or be empty); return file sizes.

    The files are written into a temporary folder beside ``out`` and moved into place at
    the end, so a failure never leaves half a model folder behind.
    """
    from safetensors.numpy import save_file

    target = Path(out)
    if target.is_symlink():  # rmdir and rename act on the link, not the folder it names
        raise ConfigError(f"{str(target)!r} is a symbolic link; give --out a real path")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            f"{str(target)!r} exists and is not an empty folder; choose another --out"
        )
    inner = base_model(model)
    module = getattr(inner, "module", None)
    if module is not None:
        from shoal.learn.export.convert import torch_module

        merged = torch_module(inner)
        assert merged is not None
        weights = {k: v.detach().float().numpy().copy() for k, v in merged.state_dict().items()}
    else:
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in inner.get_weights().items()}
    config = {
        "format": CONFIG_FORMAT,
        "library_name": "shoal",
        "model_type": f"shoal-{name}",
        "shoal_model": name,
        "shoal_options": dict(options),
        "features": int(features),
        "classes": int(classes),
        "input_dtype": input_dtype(inner),
        "framework": "pytorch" if module is not None else "numpy",
        **dict(extra or {}),
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder {str(target)!r}: {exc.strerror or exc}; choose another --out"
        ) from None
    try:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in weights.items()},
            str(staging / WEIGHTS),
            metadata={"format": "pt" if module is not None else "np"},
        )
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        sizes = {n: (staging / n).stat().st_size for n in (WEIGHTS, CONFIG)}
        card = render_card(record, title=f"{record.name} ({name})", files=sizes)
        (staging / CARD).write_text(card, encoding="utf-8")
        sizes[CARD] = (staging / CARD).stat().st_size
        staging.chmod(0o755)  # mkdtemp made it private; a model folder is for sharing
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sizes


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A hub folder's ``config.json``, checked to be one shoal wrote."""
    from shoal.learn.transfer.pretrained import inside

    path = inside(folder, CONFIG)
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} has no {CONFIG}: not a model folder")
    if path.stat().st_size > _MAX_CONFIG:
        raise ConfigError(f"{path} is larger than {_MAX_CONFIG} bytes; refusing to read it")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a model config") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ConfigError(
            f"{path} was not written by `shoal export --format hub` (format "
            f"{config.get('format') if isinstance(config, dict) else None!r}); for another "
            "model folder, build the module yourself and load its weights with "
            "shoal.learn.transfer.read_weights and load_into"
        )
    for key, kind in (
        ("shoal_model", str),
        ("shoal_options", dict),
        ("features", int),
        ("classes", int),
    ):
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key!r} must be a {kind.__name__}")
        if isinstance(value, int) and not 1 <= value <= _MAX_SIZE:
            raise ConfigError(f"{path}: {key!r} must be in [1, {_MAX_SIZE}], got {value}")
    return config


def load_pretrained(
    folder: str | os.PathLike[str], *, vocab: Sequence[str] | None = None, **overrides: Any
) -> Model:
    """The model a hub folder holds, weights loaded; its weights file is scanned first.

    ``vocab``: the vocabulary of the data it will see (a text corpus's ``vocab``); a
    :class:`~shoal.learn.transfer.VocabularyMismatch` if the model was trained on another.
    ``overrides`` replace model options (``seed``, ``optimizer``) for further training.
    """
    from shoal.learn.registry import build_model
    from shoal.learn.transfer.pretrained import check_vocabulary, inside, read_weights

    config = read_config(folder)
    if vocab is not None:
        known = config.get("vocab")
        if not isinstance(known, list):
            raise ConfigError(f"{folder}: its config records no vocabulary to check vocab= against")
        check_vocabulary(known, list(vocab))
    weights = read_weights(inside(folder, WEIGHTS))
    options = {**config["shoal_options"], **overrides}
    try:
        model = build_model(
            config["shoal_model"],
            features=config["features"],
            classes=config["classes"],
            **options,
        )
    except ShoalError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        # torch's own errors for sizes it cannot allocate: the config, not shoal, is wrong
        raise ConfigError(f"{folder}: its config does not build a model: {exc}") from None
    expected = model.get_weights()
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    shapes = sorted(
        f"{k} (file {weights[k].shape}, model {expected[k].shape})"
        for k in set(weights) & set(expected)
        if weights[k].shape != expected[k].shape
    )
    if unexpected or missing or shapes:
        raise ConfigError(
            f"{folder}: weights do not fit a {config['shoal_model']} with its config: "
            f"unexpected {unexpected}, missing {missing}, shape mismatches {shapes}"
        )
    model.set_weights({k: v.astype(expected[k].dtype) for k, v in weights.items()})
    return model
