"""Torch-free bundle tools, shared by export/ (torch) and calibration/ (precision variants):
staged writing, file records and manifest edits, ONNX saving with external data, the
end-to-end quality check. Imports only ldm_edge.runtime, numpy, onnx and onnxruntime, so
``ldm-export fp16 / int8 / import-optimum / engines`` run where there is no PyTorch."""
