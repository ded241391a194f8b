"""Export a trained model: ONNX, a NumPy-only predictor (optionally int8), a hub folder.

``shoal export RUN_ID --format onnx|numpy|hub`` (``shoal.cli.export``) drives these from a
run in the Store. ONNX needs the ``export`` extra (onnx, onnxruntime); the NumPy predictor
(:class:`NumpyPredictor`) needs NumPy alone on the device.
"""

from __future__ import annotations

from shoal.learn.export.card import TrainingRecord, card_metadata, render_card
from shoal.learn.export.convert import model_logits, numpy_program
from shoal.learn.export.device import predictor_for, write_predictor
from shoal.learn.export.hub import load_pretrained, read_config, write_hub
from shoal.learn.export.onnx import OnnxCheck, check_onnx, export_onnx
from shoal.learn.export.predictor import NumpyPredictor, PredictorError
from shoal.learn.export.quantize import quantize_int8

__all__ = [
    "NumpyPredictor",
    "OnnxCheck",
    "PredictorError",
    "TrainingRecord",
    "card_metadata",
    "check_onnx",
    "export_onnx",
    "load_pretrained",
    "model_logits",
    "numpy_program",
    "predictor_for",
    "quantize_int8",
    "read_config",
    "render_card",
    "write_hub",
    "write_predictor",
]
