PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench

demo:  ## install and run the main job on its small default
	$(PIP) -e .
	$(PY) -m experiments.demo

test:  ## install and run the whole test suite
	$(PIP) -e ".[test]"
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench:  ## decode-step time and cache bytes versus tokens seen
	$(PIP) -e .
	$(PY) -m experiments.bench_decode
