# builder: compatibility matrix -> certified container images. `make` lists the targets.
PY      ?= .venv/bin/python
SELECT  ?= --framework torch==2.4.1 --cuda 12.1 --python 3.11
OUT     ?= out/contexts
# The bench's cell: TensorFlow CPU (1.5 GB) fits a 2-core machine; BENCH_SELECT="$(SELECT)" for torch.
BENCH_SELECT ?= --framework tensorflow==2.18.0 --cuda cpu --python 3.11


.DEFAULT_GOAL := help
.PHONY: help install test test-unit lint render images golden bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## make .venv with builder and its dev tools
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'

test: ## all tests: unit (80% coverage of build, certify, bases required), then integration (needs an engine)
	$(PY) -m coverage run -m pytest -v tests/unit
	$(PY) -m coverage report --include='builder/build.py,builder/certify.py,builder/bases.py' --fail-under=80
	$(PY) -m pytest -v tests/integration

test-unit: ## the tests that need no engine
	$(PY) -m pytest -q tests/unit

lint: ## ruff, mypy, hadolint on every rendered Dockerfile, the workflow against its schema (and actionlint if installed)
	$(PY) -m ruff check builder tests
	$(PY) -m mypy
	rm -rf out/lint && mkdir -p out && $(PY) -m builder render --out out/lint >/dev/null
	find out/lint -name Dockerfile -print0 | xargs -0 -n 50 .venv/bin/hadolint
	.venv/bin/hadolint tests/golden/*.direct.Dockerfile  # render --out writes the builder-stage form only
	@# The GitHub workflow schema ships inside check-jsonschema's wheel (vendor.github-workflows): checked offline.
	.venv/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	@if [ -x .venv/bin/actionlint ]; then .venv/bin/actionlint -no-color && echo "actionlint: clean"; else echo "actionlint:" \
	  "not installed (pip install -e '.[actionlint]' fetches its binary from GitHub releases); tests/unit/test_workflow.py dry-runs the workflow"; fi

render: ## write build contexts for SELECT into OUT
	mkdir -p $(dir $(OUT)) && $(PY) -m builder render $(SELECT) --out $(OUT)

images: ## build and certify SELECT (default: torch 2.4.1 / CUDA 12.1 / Python 3.11)
	$(PY) -m builder build $(SELECT)
	$(PY) -m builder certify $(SELECT)

golden: ## refresh the golden Dockerfiles in tests/golden after a deliberate template change
	$(PY) -m tests.unit.golden

bench: ## builder against the naive recipe (BENCH_SELECT; BENCH_FULL=1 adds cold/warm builds); docs/bench.md
	$(PY) -m tests.bench $(BENCH_SELECT)

clean: ## remove rendered output (not images; see `python -m builder clean`)
	rm -rf out
