"""Training, evaluation, calibration, ONNX export and upload of the lungserve model.

Needs the `export` extra (TensorFlow, tf2onnx). The modules that need TensorFlow import
it inside functions, so `lungserve --help` works in a serving-only install.
"""
