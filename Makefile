# Two commands for a newcomer: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
TF_VENV ?= .venv-tf
PY := $(VENV)/bin/python

.PHONY: install demo test test-tf clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: install
	$(PY) main.py

# Two workers (one per core of the CI machine); a test file stays on one worker so its
# module fixtures (converted models, compiled programs) are built once.
test: install
	$(PY) -m pytest -n 2 --dist loadfile tests

# FID cross-checks against TensorFlow / tensorflow-gan, in their own venv (TF <= 2.15, numpy < 2).
$(TF_VENV)/.installed: requirements-tf.txt
	$(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF_VENV)/bin/python -m pip install -q -r requirements-tf.txt
	touch $@

test-tf: $(TF_VENV)/.installed
	$(TF_VENV)/bin/python -m pytest tests_tf

clean:
	rm -rf $(VENV) $(TF_VENV)
