# Two commands for a newcomer: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
TF_VENV ?= .venv-tf
PY := $(VENV)/bin/python

.PHONY: install demo test test-tf check-wheel clean

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

# The wheel as a user installs it: a fresh venv with only the wheel and requirements.txt
# draws 16 digits with the bundled models (isir_jax.pretrained), outside the checkout.
WHEEL_DIR := build/wheel-check
check-wheel:
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PYTHON) -m pip wheel --no-deps -q -w $(WHEEL_DIR) .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install -q -r requirements.txt $(WHEEL_DIR)/isir_jax-*.whl
	cd $(WHEEL_DIR) && venv/bin/python -c "import jax, numpy as np; \
	from isir_jax import pretrained; m = pretrained.digits('skew'); \
	x, _ = jax.jit(m.sampler())(jax.random.split(jax.random.key(0), 16)); \
	assert x.shape == (16, 8, 8, 1) and np.isfinite(x).all(); \
	print('16 digits, predicted classes', m.feature_net.predict(np.asarray(x)).tolist())"

clean:
	rm -rf $(VENV) $(TF_VENV) $(WHEEL_DIR)
