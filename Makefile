# Two commands: `make run` (install everything, start the whole stack under supervisord) and `make test`
# (install, run the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= config/llm_config.yaml

# llama.cpp builds for the CPU it is built on (-march=native), AMX included where the CPU lists it; some virtual
# machines list AMX but stop its first instruction (SIGILL on the first long prompt). There, unless CMAKE_ARGS is
# given, build for the same CPU family without AMX.
ifeq ($(origin CMAKE_ARGS),undefined)
ifneq ($(shell grep -s -m1 -o amx_tile /proc/cpuinfo),)
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
endif
endif

.PHONY: run manager status test install models lint bench clean

run: install
	mkdir -p run/logs
	$(VENV)/bin/supervisord -c supervisord.conf

manager: install
	$(PY) -m model_manager --config $(CONFIG)

status:
	$(VENV)/bin/supervisorctl -c supervisord.conf status

test: install
	$(PY) -m pytest -q

install: $(VENV)/.installed models

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed"; exit 1; }
	@command -v cmake >/dev/null && command -v c++ >/dev/null || \
		{ echo "llama-cpp-python builds from source: sudo apt-get install -y build-essential cmake python3-venv python3-dev"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,test]'
	touch $@

models: $(VENV)/.installed
	$(PY) scripts/install_models.py --dest models

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/transport.py
	$(PY) bench/batching.py
	$(PY) bench/speech.py
	$(PY) bench/voice_turn.py

clean:
	rm -rf $(VENV) models run
