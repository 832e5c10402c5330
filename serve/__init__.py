"""Serving a bundle on NVIDIA Triton Inference Server: the model repository writer
(``ldm-export triton``), the Python-backend models it uses, and ``ldm-serve``. Torch-free."""
