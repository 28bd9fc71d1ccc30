"""Exporters from training frameworks to ONNX (needs the ``torch`` extra)."""
