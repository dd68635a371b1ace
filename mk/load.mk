# Locust load tests (load_tests/, docs/load-tests.md), included at the end of
# the Makefile: uses its PY and demo-model. Defaults live in load_tests/run.py;
# a variable left empty passes no flag. Any other flag: LOAD_ARGS="...".
LOAD_USERS ?=
LOAD_SPAWN_RATE ?=
LOAD_DURATION ?=
LOAD_TRANSPORT ?=
LOAD_URL ?=
LOAD_GRPC_URL ?=
LOAD_SWEEP_USERS ?=
LOAD_STEP_DURATION ?=
LOAD_WEB_PORT ?=
LOAD_ARGS ?=

LOAD_FLAGS = $(if $(LOAD_URL),--url $(LOAD_URL)) $(if $(LOAD_GRPC_URL),--grpc-url $(LOAD_GRPC_URL)) \
	$(if $(LOAD_USERS),-u $(LOAD_USERS)) $(if $(LOAD_SPAWN_RATE),-r $(LOAD_SPAWN_RATE)) \
	$(if $(LOAD_DURATION),-t $(LOAD_DURATION)) $(if $(LOAD_TRANSPORT),--transport $(LOAD_TRANSPORT))

.PHONY: load load-sweep load-ui soak

# demo-model: the server started here serves it, and its tokenizer sizes the prompts.
load: demo-model ## headless Locust run (LOAD_USERS=4 LOAD_DURATION=30s, LOAD_URL/LOAD_GRPC_URL: a running server); report in load_tests/reports/
	$(PY) -m load_tests.run run $(LOAD_FLAGS) $(LOAD_ARGS)

load-sweep: demo-model ## concurrency sweep (LOAD_SWEEP_USERS=1,2,4,...,64, LOAD_STEP_DURATION=30s) and its throughput-latency plot
	$(PY) -m load_tests.run sweep $(LOAD_FLAGS) $(if $(LOAD_SWEEP_USERS),--sweep-users $(LOAD_SWEEP_USERS)) \
		$(if $(LOAD_STEP_DURATION),--step-duration $(LOAD_STEP_DURATION)) $(LOAD_ARGS)

load-ui: demo-model ## the Locust web UI on 127.0.0.1:8089 (LOAD_WEB_PORT) against a server started here (or LOAD_URL); Ctrl-C ends it
	$(PY) -m load_tests.run ui $(LOAD_FLAGS) $(if $(LOAD_WEB_PORT),--web-port $(LOAD_WEB_PORT)) $(LOAD_ARGS)

soak: demo-model ## 10-minute soak of a real server (memory flat after warm-up, KV blocks back to 0, no failures): build/reliability/soak.json
	$(PY) -m load_tests.soak $(SOAK_ARGS)
