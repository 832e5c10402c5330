"""Heavy side: checkpoint loading, ONNX export, precision rewrites, engine building (imports torch)."""
