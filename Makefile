# Two commands for a new machine (see README): `make test` and `make serve`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

CONFIG ?= configs/local.yaml

.PHONY: test serve checkpoints bench bench-quick bench-serve clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins the CPU torch wheel; on a GPU machine install torch first and drop the pin.
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

test: $(VENV)/.installed  ## set up, then run the whole test suite
	$(PY) -m pytest -q

# The config check fetches every model's weights first (progress bars, several at once) and stops here, before Ray
# starts, with one line per model whose weights cannot be had.
# qwen3-serve is `serve run` behind Ray Serve's HAProxy ingress (QWEN3_SERVE_HAPROXY=0 make serve: the Python proxy),
# leaving nothing listening after Ctrl-C or SIGTERM.
serve: $(VENV)/.installed  ## set up, then serve CONFIG (default configs/local.yaml; offline: CONFIG=configs/tiny.yaml)
	$(PY) -m serve_app.replica.weights --fetch $(CONFIG)
	$(VENV)/bin/qwen3-serve $(CONFIG)

checkpoints: $(VENV)/.installed  ## tiny offline reranker + embedder checkpoints in checkpoints/
	$(PY) -m models.checkpoints --out checkpoints

bench-quick: $(VENV)/.installed  ## engine benchmark on the tiny models (no reference run): seconds
	$(PY) bench/engine_bench.py --shape tiny --skip-reference

bench: $(VENV)/.installed  ## engine benchmark, shape-true 0.6B vs the model cards' code: minutes on CPU
	$(PY) bench/engine_bench.py --shape 0.6b --repeats 1

bench-serve: $(VENV)/.installed  ## HTTP vs in-process, shape-true 0.6B widths, 4 layers: minutes on CPU
	$(PY) bench/serve_bench.py

clean:
	rm -rf $(VENV) checkpoints
