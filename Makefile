# ldm-edge: the two setup commands are `make demo` and `make test`.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
OUT      := out
MINUTES  ?= 115
PRECISION ?= fp32
N        ?= 200
# tiny models gain nothing from threads; see tests/conftest.py
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: install test test-fast demo demo-lora train-demo eval-demo eval-demo-torch bench gpu-check clean serve serve-venv

install: $(STAMP)

# torch first, pinned, so no multi-GB CUDA build is pulled in; then the package with
# the extras the tests and the demo need.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,demo,test,openvino,control]"
	touch $(STAMP)

test: install serve-venv
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -ra tests/unit

demo: install
	@mkdir -p $(OUT)
	$(BIN)/python -m ldm_edge.demo.make_demo --out $(OUT)

# the demo LoRA (demo/weights/lora): one prompt without | with it, drawn by the lean runtime
# from the demo bundle (ldm-run --lora) -> out/demo-lora.png
demo-lora: demo
	$(BIN)/python -m ldm_edge.demo.eval_lora --draw --bundle $(OUT)/demo-bundle --out $(OUT)

train-demo: install
	$(BIN)/python -m ldm_edge.demo.train --stage all --minutes $(MINUTES)

eval-demo: install
	$(BIN)/python -m ldm_edge.demo.eval_bundle --precision $(PRECISION) --n $(N)

# the same prompts and latents sampled in PyTorch with diffusers (the reference)
eval-demo-torch: install
	$(BIN)/python -m ldm_edge.demo.eval_bundle --reference diffusers --n $(N)

# side-by-side benchmark vs diffusers; QUICK=1: demo + SD1.5 arch at 256², < 15 min;
# FEW_STEP=1: then LCM SD1.5 at 4 steps and SD-Turbo-shaped SD2.1 at 1 step, 512² (~40 min fresh)
# CONTROLNET=1: then one ControlNet per step at 512², SD1.5 arch (benchmarks/bench_controlnet.py)
# SDXL=1: then the SDXL architecture (random weights) at 1024² and Turbo-style 512² beside
# diffusers, and ldm-run's memory modes (benchmarks/bench_sdxl.py; ~16 GiB free RAM, ~35 GB disk)
bench: install
	env -u OMP_NUM_THREADS $(BIN)/python benchmarks/bench.py $(if $(QUICK),--quick,) $(if $(FEW_STEP),--few-step,)
	$(if $(CONTROLNET),env -u OMP_NUM_THREADS $(BIN)/python benchmarks/bench_controlnet.py,)
	$(if $(SDXL),env -u OMP_NUM_THREADS $(BIN)/python benchmarks/bench_sdxl.py --make-int8,)

# a CUDA machine with TensorRT, < 10 min: FP16/INT8 engines for the demo and tiny SD1, ldm-run on
# them vs onnxruntime (PSNR, timings), the demo LoRA refitted -> out/gpu-check/report.md
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out $(OUT)/gpu-check

# Triton serving: a separate venv for the server's Python models (numpy<2: the Python-backend
# stub of the nvidia-pytriton wheel fails every request with numpy 2; docs/serving.md)
SERVE_VENV  := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

serve-venv: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml
	$(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q -e ".[serve]"
	touch $(SERVE_STAMP)

# serves the demo bundle (made by `make demo`) on loopback until Ctrl-C: the tritonserver on
# PATH (NVIDIA's container), else the one in .venv-serve
serve: install serve-venv
	@test -f $(OUT)/demo-bundle/manifest.json || $(MAKE) demo
	$(BIN)/ldm-serve $(OUT)/demo-bundle

clean:
	rm -rf $(OUT) .pytest_cache
