"""The accelerator check: compiled kernels against the reference, decode bandwidth, generate speed.

On a GPU or TPU this
1. runs the `device` tests (compiled Pallas kernels against the jnp reference,
   and generate with the default impl against XLA) in a pytest subprocess;
2. times decode attention, Pallas against XLA, bf16, Llama-3-8B heads (8 KV
   heads of 128, GQA 4), over capacities 1k-64k and batches 1-64, and reports
   the bytes it must read (K, V, masks) per second as a fraction of the chip's
   peak HBM bandwidth (TPU: `pltpu.get_tpu_info()`; GPU: `PEAK_HBM` below);
3. measures SmolLM2-135M `generate` tokens/s per policy (1,024-token prompt,
   128 new tokens, capacity 512, batch 8).
It writes `results/device_check/device_check.json` and `.md`.

On CPU the same code runs at tiny sizes with the kernels interpreted and the
tiny random model, so CI proves the script works (the fractions of peak mean
nothing there, and the CPU has no peak in the table).

    python -m experiments.device_check [--out results/device_check]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import kvjax
from experiments.bench_kernels import make_inputs, timer
from experiments.results import write_json
from pallas_kernels import cache_attention, cache_attention_xla

# Peak HBM bandwidth in bytes/s by a substring of `device_kind` (vendors' data sheets).
PEAK_HBM = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM
    "A100-SXM4-80GB": 2.039e12,
    "A100-PCIE-80GB": 1.935e12,
    "A100": 1.555e12,  # 40 GB
    "L4": 0.3e12,
    "T4": 0.32e12,
}
POLICIES = ("full", "streaming_llm", "h2o", "tova", "snapkv", "pyramidkv", "knorm", "kvmerger", "pod")
ON_DEVICE = dict(capacities=(1024, 4096, 16384, 65536), batches=(1, 8, 64), kv_heads=8, group=4, head_dim=128,
                 prompt=1024, new_tokens=128, capacity=512, batch=8, repeats=20)
ON_CPU = dict(capacities=(256,), batches=(1, 2), kv_heads=2, group=2, head_dim=64,
              prompt=48, new_tokens=8, capacity=32, batch=2, repeats=2)


def peak_hbm() -> float | None:
    """Bytes/s the chip's HBM can deliver, or None where unknown (CPU, a GPU missing from the table)."""
    device = jax.devices()[0]
    if device.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return float(pltpu.get_tpu_info().mem_bw_bytes_per_second)
    return next((bw for name, bw in PEAK_HBM.items() if name in device.device_kind), None)


def run_device_tests() -> dict:
    """`pytest -m device` in a subprocess that sees the accelerator (the test suite defaults to CPU)."""
    platforms = "cpu" if jax.default_backend() == "cpu" else os.environ.get("JAX_PLATFORMS", "")
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "device", "tests/test_pallas_kernels.py", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parent.parent)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    print(f"device tests: {summary}")
    return dict(returncode=done.returncode, summary=summary, output_tail=done.stdout[-4000:])


def decode_bandwidth(sizes: dict, peak: float | None) -> list[dict]:
    """Decode attention (one query token) time per (capacity, batch, impl); bytes read per second."""
    accelerator = jax.default_backend() != "cpu"
    dtype = jnp.bfloat16
    impls = {"xla": cache_attention_xla, "pallas": functools.partial(cache_attention, interpret=not accelerator)}
    rows = []
    jobs = [(c, b, impl) for c in sizes["capacities"] for b in sizes["batches"] for impl in impls]
    for capacity, batch, impl in tqdm(jobs, desc="decode attention", unit="config"):
        kv_bytes = 2 * batch * sizes["kv_heads"] * capacity * sizes["head_dim"] * 2
        if accelerator and kv_bytes > 0.4 * jax.devices()[0].memory_stats().get("bytes_limit", float("inf")):
            continue  # does not fit beside XLA's temporaries
        args, read, _ = make_inputs(jax.random.key(capacity), batch=batch, kv_heads=sizes["kv_heads"], group=sizes["group"],
                                    capacity=capacity, chunk=1, head_dim=sizes["head_dim"], dtype=dtype)
        fn = jax.jit(functools.partial(impls[impl], group=sizes["group"], scale=sizes["head_dim"] ** -0.5))
        seconds = timer(fn, *args, repeats=sizes["repeats"])
        rows.append(dict(capacity=capacity, batch=batch, impl=impl, us=1e6 * seconds, bytes_read=read,
                         bytes_per_s=read / seconds, of_peak=None if peak is None else read / seconds / peak))
        del args
    return rows


def generate_speed(sizes: dict) -> list[dict]:
    """generate tokens/s per policy (default impl: the kernels on an accelerator, XLA on CPU)."""
    if jax.default_backend() == "cpu":
        from flax import nnx

        from models import Llama, LlamaConfig

        model, name = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)), "tiny"
    else:
        from models import load

        model, name = load("smollm2-135m", dtype="bfloat16")[0], "smollm2-135m"
    prompt = np.asarray(jax.random.randint(jax.random.key(0), (sizes["batch"], sizes["prompt"]), 1, model.vocab_size))
    rows = []
    for policy_name in tqdm(POLICIES, desc="generate", unit="policy"):
        options = dict(window=16) if policy_name in ("snapkv", "pyramidkv") else {}
        policy = kvjax.policies.make(policy_name, capacity=sizes["prompt"] + sizes["new_tokens"] if policy_name == "full" else sizes["capacity"], **options)
        run = lambda: kvjax.generate(model, prompt, policy=policy, max_new_tokens=sizes["new_tokens"], chunk_size=256)  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            jax.block_until_ready(run().tokens)  # compile
            start = time.perf_counter()
            jax.block_until_ready(run().tokens)
        seconds = time.perf_counter() - start
        rows.append(dict(model=name, policy=policy_name, seconds=seconds,
                         tokens_per_s=sizes["batch"] * sizes["new_tokens"] / seconds))
    return rows


def markdown(meta: dict, tests: dict, decode: list[dict], gen: list[dict]) -> str:
    sizes = meta["sizes"]
    lines = [f"# Device check: {meta['device']} (JAX {meta['jax']})", "", f"Device tests: {tests['summary']}", "",
             f"## Decode attention, bf16, {sizes['kv_heads']} KV heads x {sizes['head_dim']}, GQA {sizes['group']}", "",
             "| slots | batch | impl | us | GB/s read | of peak HBM |", "|---:|---:|---|---:|---:|---:|"]
    for r in decode:
        peak = "n/a" if r["of_peak"] is None else f"{r['of_peak']:.2f}"
        lines.append(f"| {r['capacity']} | {r['batch']} | {r['impl']} | {r['us']:.1f} | {r['bytes_per_s'] / 1e9:.1f} | {peak} |")
    lines += ["", f"## generate, {gen[0]['model'] if gen else ''}", "", "| policy | tokens/s |", "|---|---:|"]
    lines += [f"| {r['policy']} | {r['tokens_per_s']:.1f} |" for r in gen]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/device_check")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the device tests")
    args = parser.parse_args(argv)
    sizes = ON_CPU if jax.default_backend() == "cpu" else ON_DEVICE
    peak = peak_hbm()
    meta = dict(device=jax.devices()[0].device_kind, platform=jax.default_backend(), jax=jax.__version__, peak_hbm_bytes_per_s=peak,
                sizes={k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()})
    tests = dict(summary="skipped (--skip-tests)", returncode=0) if args.skip_tests else run_device_tests()
    decode = decode_bandwidth(sizes, peak)
    gen = generate_speed(sizes)
    report = dict(meta=meta, tests=tests, decode=decode, generate=gen)
    out = pathlib.Path(args.out)
    write_json(out / "device_check.json", report)
    (out / "device_check.md").write_text(markdown(meta, tests, decode, gen))
    print(markdown(meta, tests, decode, gen))
    if tests["returncode"] not in (0, 5):
        raise SystemExit(f"device tests failed: {tests['summary']}")
    return report


if __name__ == "__main__":
    main()
