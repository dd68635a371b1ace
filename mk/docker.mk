# Docker images and the compose deployment (docs/deploy.md, docker/).
# Included at the end of the Makefile: uses its STAMP and PY.

# The CPU images' base: by default one built here from Debian packages
# (`make docker-base`, no registry needed); BASE_IMAGE=python:3.11-slim where
# Docker Hub is reachable.
DOCKER_BASE_IMAGE ?= trillm/base:bookworm
BASE_IMAGE ?= $(DOCKER_BASE_IMAGE)
export BASE_IMAGE
WHEELHOUSE := build/wheelhouse
# The images' torch: the CPU build of the Makefile's version (docs/deploy.md, "torch").
TORCH_VERSION ?= $(patsubst torch==%,%,$(TORCH_SPEC))
# `docker compose` (v2) when installed, else `docker-compose` (v1.29, Debian's).
ifndef COMPOSE
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
endif
COMPOSE_PROJECT ?= trillm
# GPU=1: the TensorRT-LLM server (profile gpu) instead of the CPU one.
SERVER := $(if $(GPU),triton-gpu,triton)
DC_PROJECT = $(COMPOSE) -p $(COMPOSE_PROJECT)
DC = $(DC_PROJECT) --profile load $(if $(GPU),--profile gpu)

.PHONY: docker-base docker-wheelhouse docker-build up down logs

docker-base: ## build trillm/base:bookworm (Debian + Python 3.11) with debootstrap; skipped when up to date
	docker/build_base.sh $(DOCKER_BASE_IMAGE)

WHEELHOUSE_INPUTS := backends/pyproject.toml client/pyproject.toml docker/wheelhouse.sh \
	$(shell find backends/trillm client \( -name '*.py' -o -name '*.cpp' -o -name '*.h' \) 2>/dev/null)

$(WHEELHOUSE)/.complete: $(STAMP) $(WHEELHOUSE_INPUTS)
	PYTHON=$(PY) TORCH_VERSION=$(TORCH_VERSION) docker/wheelhouse.sh $(WHEELHOUSE)
	touch $@

docker-wheelhouse: $(WHEELHOUSE)/.complete ## collect every wheel the images install (torch CPU included) into build/wheelhouse

docker-build: docker-wheelhouse $(if $(filter $(DOCKER_BASE_IMAGE),$(BASE_IMAGE)),docker-base) ## build the server (GPU=1: the GPU one), Prometheus and Locust images (layer-cached)
	$(DC) build $(SERVER) prometheus locust

# .env holds the admin key: made once from docker/env.example with a random key, never overwritten.
.env:
	sed "s/^TRITON_ADMIN_KEY=.*/TRITON_ADMIN_KEY=$$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')/" docker/env.example >$@
	chmod 600 $@
	@echo "== wrote $@ (admin key for model control: TRITON_ADMIN_KEY in $@)"

up: .env docker-build ## build what changed, start the server (GPU=1: the GPU one) and Prometheus in the background
	mkdir -p build/checkpoints $(if $(GPU),build/engines)
	$(DC) up -d $(SERVER) prometheus
	@echo "== HTTP, gRPC and metrics on 127.0.0.1 (ports in .env); \`make logs\` follows them, \`make down\` stops them"

down: ## stop and remove the deployment's containers, whichever server runs (keeps Prometheus data)
	$(DC_PROJECT) --profile load --profile gpu down --remove-orphans

logs: ## follow the deployment's logs
	$(DC) logs -f --tail=100
