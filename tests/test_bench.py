import json

import pytest
import torch

from quintet import bench

SUITE = """
def run(quick=False):
    return {"ratios": {"speedup": 2.5}, "quick": quick}
"""


def test_run_suites_writes_json_and_prints_table(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_core.py").write_text(SUITE)
    monkeypatch.setenv("QUINTET_BENCHMARKS", str(tmp_path))
    bench.run_suites(["core"], quick=True, out_dir=tmp_path / "out")
    result = json.loads((tmp_path / "out" / "core.json").read_text())
    assert result["ratios"] == {"speedup": 2.5} and result["quick"] is True
    assert "environment" in result
    assert "speedup" in capsys.readouterr().out


def test_unknown_suite_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "bench_core.py").write_text(SUITE)
    monkeypatch.setenv("QUINTET_BENCHMARKS", str(tmp_path))
    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'"):
        bench.run_suites(["nope"], out_dir=tmp_path / "out")
    assert bench.main(["nope", "--out", str(tmp_path / "out")]) == 2


def test_peak_memory_sees_a_large_temporary():
    def allocate():
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed on return
        return float(big[0])

    peak = bench.peak_memory(allocate)
    assert peak is not None and 48 * 2**20 <= peak <= 256 * 2**20


def test_time_fn_returns_seconds_per_call():
    assert 0 < bench.time_fn(lambda: torch.ones(100).sum(), min_run_time=0.05) < 0.1


def test_count_flops_counts_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert bench.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_matmul_rate_is_measured_and_cached():
    rate = bench.matmul_flops_per_s(size=128)
    assert rate > 1e6
    assert bench.matmul_flops_per_s(size=128) == rate


def test_checkpoint_io_times_a_write_and_a_load(tmp_path):
    """The training suite's checkpoint timing runs against the Trainer's current state API (one process)."""
    import json

    from quintet.benchmarks import checkpoint_io

    out = tmp_path / "io.json"
    checkpoint_io.main("ddp", tmp_path / "run", out)
    result = json.loads(out.read_text())
    assert result["mode"] == "ddp" and result["processes"] == 1
    assert result["write_s"] > 0 and result["load_s"] > 0 and result["checkpoint_bytes"] > 0
