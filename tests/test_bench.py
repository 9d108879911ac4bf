"""bench_moe.py's main on a tiny shape: every figure it reports exists and is positive."""

import pytest

from experiments import bench_moe, grouped_breakdown

TINY = [
    *("--experts", "4", "--routers", "topp", "--dispatch", "index", "grouped"),
    *("--tokens", "128", "--seq-len", "64", "--d-model", "16", "--d-ff", "32"),
    *("--matmul-size", "128", "--sweep-experts", "4", "--reps", "1"),
    *("--budget-factors", "1.1", "--block-sizes", "8", "--group-sizes", "128"),
    *("--priority-factors", "0.5", "--memory-groups", "64", "--memory-experts", "4"),
    *("--sections", "grid", "matched", "budget", "blocks", "groups", "priority", "memory"),
]
POSITIVE = ("ms", "dense_ms", "gflops", "x_dense", "of_matmul_rate", "temp_mib", "compile_s")


@pytest.mark.slow
def test_bench_main_reports_positive_figures(tmp_path):
    path = tmp_path / "bench.json"
    out = bench_moe.main([*TINY, "--json", str(path)])
    assert path.exists() and out["matmul_gflops"] > 0
    assert [r["dispatch"] for r in out["grid"]] == ["index", "grouped"]
    assert out["sweep"] == []
    timed = out["grid"] + out["matched"] + out["budget"] + out["blocks"] + out["groups"]
    assert len(timed) == 2 + 2 + 1 + 1 + 1
    for row in timed:
        for field in POSITIVE:
            assert row[field] > 0, (field, row)
        assert 1.0 <= row["experts_per_token"] <= 4
        assert 0.0 <= row["dropped_fraction"] < 1.0
        assert row["slots_per_token"] > 0
    # top-p grouped with budget 1.25 x k=2 rarely binds; block padding puts rows >= selections
    grouped = out["grid"][1]
    assert grouped["slots_per_token"] >= grouped["experts_per_token"] * (
        1 - grouped["dropped_fraction"]
    )
    orders = {r["drop_order"]: r for r in out["priority"]}
    assert orders["rank"]["dropped_fraction"] == orders["weight"]["dropped_fraction"] > 0
    assert 0 < orders["weight"]["output_lost"] <= orders["rank"]["output_lost"]
    assert [r["dispatch"] for r in out["memory"]] == ["index", "einsum", "grouped", "grouped"]
    assert all(r["temp_mib"] > 0 for r in out["memory"])


@pytest.mark.slow
def test_grouped_breakdown_rebuilds_the_layers_rows(tmp_path):
    tiny = ["--tokens", "256", "--seq-len", "64", "--d-model", "16", "--d-ff", "32"]
    tiny += ["--matmul-size", "128", "--fresh-mib", "8", "--reps", "1"]
    path = tmp_path / "breakdown.json"
    out = grouped_breakdown.main(["--experts", "4", "--json", str(path), *tiny])
    assert path.exists() and [r["router"] for r in out["rows"]] == ["top2", "topp"]
    for row in out["rows"]:
        # Its experts-alone buffer has exactly the rows the layer says it computed.
        assert row["rows_per_token"] == row["layer_rows_per_token"] > 0
        assert set(row["ms"]) == {"layer", "experts alone", "dense ideal"}
        assert all(v > 0 for v in row["ms"].values()) and row["x_dense"]["dense ideal"] == 1.0
        assert all(v >= 0 for v in row["faults_k"].values())
    assert out["fresh_write"]["mib"] == 8
    assert out["fresh_write"]["ms"] > 0


@pytest.mark.parametrize(
    "flag, value", [("--reps", "0"), ("--fresh-mib", "-8"), ("--experts", "x")]
)
def test_grouped_breakdown_refuses_bad_flags_in_one_line(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        grouped_breakdown.parse_args([flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in err and value in err, err
