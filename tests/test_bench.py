"""bench_moe.py's main on a tiny shape: every figure it reports exists and is positive."""

from experiments import bench_moe

TINY = [
    *("--experts", "4", "--routers", "topp", "--dispatch", "index", "dropless"),
    *("--tokens", "128", "--seq-len", "64", "--d-model", "16", "--d-ff", "32"),
    *("--matmul-size", "128", "--sweep-experts", "4", "--reps", "1", "--sections", "grid"),
]
POSITIVE = ("ms", "dense_ms", "gflops", "x_dense", "of_matmul_rate", "temp_mib", "compile_s")


def test_bench_main_reports_positive_figures(tmp_path):
    path = tmp_path / "bench.json"
    out = bench_moe.main([*TINY, "--json", str(path)])
    assert path.exists() and out["matmul_gflops"] > 0
    assert [r["dispatch"] for r in out["grid"]] == ["index", "dropless"]
    assert out["sweep"] == out["matched"] == out["memory"] == []
    for row in out["grid"]:
        for field in POSITIVE:
            assert row[field] > 0, (field, row)
        assert 1.0 <= row["experts_per_token"] <= 4
        assert 0.0 <= row["dropped_fraction"] < 1.0
    assert out["grid"][1]["dropped_fraction"] == 0.0  # dropless
