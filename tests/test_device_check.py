"""`experiments.device_check` end to end on CPU: interpreted kernels, tiny sizes, its report written."""

import json

from experiments import device_check


def test_device_check_runs_and_reports(tmp_path):
    report = device_check.main(["--out", str(tmp_path)])
    assert "skipped" in report["tests"]["summary"]  # the compiled cases need a GPU or TPU
    decode = report["decode"]
    assert {(r["impl"], r["batch"]) for r in decode} == {(i, b) for i in ("xla", "pallas") for b in device_check.ON_CPU["batches"]}
    assert all(r["bytes_per_s"] > 0 and r["of_peak"] is None for r in decode)  # no CPU peak in the table
    assert [r["policy"] for r in report["generate"]] == list(device_check.POLICIES)
    assert all(r["tokens_per_s"] > 0 for r in report["generate"])
    assert json.loads((tmp_path / "device_check.json").read_text())["meta"]["platform"] == "cpu"
    table = (tmp_path / "device_check.md").read_text()
    assert "| 256 | 2 | pallas |" in table and "| kvmerger |" in table


def test_peak_bandwidth_table_matches_by_device_kind(monkeypatch):
    class FakeGPU:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(device_check.jax, "devices", lambda: [FakeGPU()])
    assert device_check.peak_hbm() == 3.35e12
    FakeGPU.device_kind = "NVIDIA H200"
    assert device_check.peak_hbm() == 4.8e12
    FakeGPU.device_kind = "Some GPU"
    assert device_check.peak_hbm() is None
