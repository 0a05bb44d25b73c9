"""lungserve: micro-batched ONNX Runtime serving for a lung histopathology CNN."""

__version__ = "0.1.0"
