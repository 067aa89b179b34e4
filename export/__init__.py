"""Thin command-line tools over :mod:`visreg_hub.inference.onnx` (never imported by the library).

python -m export.export MODEL OUT.onnx [flags]     # = visreg-hub export onnx MODEL OUT.onnx
python -m export.validate MODEL FILE.onnx          # ONNX Runtime vs PyTorch, report table
python -m export.benchmark FILE.onnx               # images/s of an exported file per batch size
"""
