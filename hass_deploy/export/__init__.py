"""Deployable artifacts: ONNX step graphs with a manifest (`onnx.py`), checks against PyTorch (`parity.py`)."""
