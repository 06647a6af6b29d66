"""Interop and edge deployment: Hugging Face import, ONNX export, int8 weight quantization."""
