"""The benchmark harness (``experiments/bench/``) against independent references, and every
benchmark script's main on a tiny shape: every figure it reports exists and is positive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import bench_decode_peers, bench_moe, grouped_breakdown
from experiments.bench import dense, harness, layers
from experiments.flops import swiglu_fwd_bwd_flops

# ----------------------------------------------------------------------------- harness


def _recording_program(name, calls):
    """A Program whose 'compiled' function records each call (block_until_ready passes a
    Python value through)."""
    return harness.Program(lambda: calls.append(name) or name, (), compile_s=0.0)


def test_interleaved_timing_calls_one_of_each_per_round_after_a_warm_up():
    calls = []
    programs = {n: _recording_program(n, calls) for n in ("a", "b", "c")}
    timings = harness.Bench(reps=3).time(programs)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 3  # warm-ups, then rounds
    assert list(timings.all_ms) == ["a", "b", "c"]
    assert all(len(t) == 3 and min(t) >= 0 for t in timings.all_ms.values())
    assert timings.first_out == "a" and timings.median("b") == np.median(timings.all_ms["b"])
    assert timings.load >= 0
    calls.clear()
    slow = harness.Bench(reps=5, slow_s=0.0).time(programs)  # any warm-up is "slow"
    assert calls == ["a", "b", "c"] * 2 and [len(t) for t in slow.all_ms.values()] == [1, 1, 1]


def test_bench_compiles_once_per_key_and_reports_what_xla_says():
    bench = harness.Bench(reps=2)
    double = lambda x: 2 * x  # noqa: E731
    first = bench.compile(double, (jnp.arange(4.0),), key="double")
    again = bench.compile(double, (jnp.ones(4),), key="double")
    assert again.compiled is first.compiled and again.compile_s == first.compile_s > 0
    np.testing.assert_array_equal(again(), 2 * np.ones(4))  # its own arguments
    assert harness.signature(double, (jnp.ones(4),)) == harness.signature(double, (jnp.zeros(4),))
    assert harness.signature(double, (jnp.ones(4),)) != harness.signature(double, (jnp.ones(5),))
    big = bench.compile(lambda x: jnp.sort(x @ x.T, axis=0) @ x, (jnp.ones((64, 64)),))
    assert big.temp_bytes >= 0 and big.temp_bytes == int(
        big.compiled.memory_analysis().temp_size_in_bytes
    )


TINY_LAYER = layers.LayerShape(tokens=512, seq_len=64, d_model=16, d_ff=32, threshold=0.4)


def _numpy_top_p_mean_k(x, router_DE, threshold):
    """Mean experts per token of top-p in float64: the smallest prefix of the descending
    probabilities whose sum reaches the threshold."""
    logits = np.asarray(x, np.float64).reshape(-1, router_DE.shape[0]) @ np.asarray(router_DE)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = -np.sort(-probs / probs.sum(-1, keepdims=True), axis=-1)
    before = np.cumsum(probs, axis=-1) - probs  # the sum of the ranks above each rank
    return float(np.mean(np.sum(before < threshold, axis=-1)))


@pytest.mark.parametrize("target", [1.2, 2.5])
def test_calibrate_brings_top_p_to_its_target_mean_k(target):
    x = TINY_LAYER.input()
    router_DE = layers.make_layer(TINY_LAYER, 8, "topp", "grouped").router_DE[...]
    fresh = _numpy_top_p_mean_k(x, router_DE, TINY_LAYER.threshold)
    scale = layers.calibrate(router_DE, x, TINY_LAYER.threshold, target)
    assert abs(fresh - target) > 0.3  # the fresh router is far off: calibration does the work
    assert _numpy_top_p_mean_k(x, router_DE * scale, TINY_LAYER.threshold) == pytest.approx(
        target, abs=0.05
    )
    # The scaled layer's own routing agrees.
    layer = layers.make_layer(TINY_LAYER, 8, "topp", "grouped", scale, capacity_factor=None)
    assert float(nnx.jit(lambda m, x: m(x)[1])(layer, x)["experts_per_token"]) == pytest.approx(
        target, abs=0.05
    )


@pytest.mark.parametrize("router, dispatch", [("top2", "index"), ("topp", "grouped")])
def test_fwd_bwd_gradients_equal_jax_grad_of_the_layers_loss(router, dispatch):
    layer = layers.make_layer(TINY_LAYER, 4, router, dispatch, 2.0)
    x = TINY_LAYER.input()
    fn, params = layers.fwd_bwd(layer)
    (grad_params, grad_x), stats = jax.jit(fn)(params, x)

    def loss(model, x):
        return jnp.sum(model(x)[0])

    ref_params, ref_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
    # float32 sums in another order (jit against eager): close to the gradients' own scale.
    for got, want in zip(jax.tree.leaves(grad_params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(grad_x, ref_x, rtol=1e-5, atol=1e-5 * np.abs(ref_x).max())
    aux = nnx.jit(lambda m, x: m(x)[1])(layer, x)
    assert set(stats) == set(layers.STATS)
    assert all(float(stats[k]) == pytest.approx(float(aux[k])) for k in layers.STATS)


def test_fwd_bwd_input_gradient_matches_forward_mode():
    # The capacity path has no custom VJP, so forward mode gives an independent derivative
    # along a random direction (the grouped path's kernels define their backward only).
    layer = layers.make_layer(TINY_LAYER, 4, "top2", "index", 2.0)
    x = TINY_LAYER.input()
    fn, params = layers.fwd_bwd(layer)
    (_, grad_x), _ = jax.jit(fn)(params, x)
    v = jax.random.normal(jax.random.key(5), x.shape)
    _, tangent = nnx.jit(lambda m, x, v: jax.jvp(lambda x: jnp.sum(m(x)[0]), (x,), (v,)))(
        layer, x, v
    )
    assert float(jnp.vdot(grad_x, v)) == pytest.approx(float(tangent), rel=1e-4)


def _swiglu_grads_by_hand(params, x):
    """Gradients of sum((silu(x Wg) * (x Wu)) Wd) for (Wg, Wu, Wd) and x, in float64."""
    w_gate, w_up, w_down = (np.asarray(w, np.float64) for w in params)
    x = np.asarray(x, np.float64)
    g, u = x @ w_gate, x @ w_up
    s = 1 / (1 + np.exp(-g))
    h = g * s * u
    dh = np.ones((x.shape[0], w_down.shape[1])) @ w_down.T
    dg, du = dh * u * (s + g * s * (1 - s)), dh * g * s
    grads = [x.T @ dg, x.T @ du, h.T @ np.ones((x.shape[0], w_down.shape[1]))]
    return grads, dg @ w_gate.T + du @ w_up.T


@pytest.mark.parametrize("fused", [False, True])
def test_dense_ideal_gradients_match_a_hand_derivation(fused):
    fn, (params, x) = dense.dense_swiglu(32, 8, 12, jnp.float32, fused=fused)
    grad_params, grad_x = jax.jit(fn)(params, x)
    want_params, want_x = _swiglu_grads_by_hand(params, x)
    for got, want in zip(grad_params, want_params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_x, want_x, rtol=1e-4, atol=1e-5)
    assert swiglu_fwd_bwd_flops(32, 8, 12) == 3 * 3 * 2 * 32 * 8 * 12


# ----------------------------------------------------------------------------- scripts

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
    tiny += ["--fresh-mib", "8", "--reps", "1"]
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


def _refusal(entry, argv, capsys) -> str:
    """The one stderr line with which ``entry(argv)`` (a script's parse_args or main) refuses
    bad input, after checking that it exits 2."""
    with pytest.raises(SystemExit) as exit_:
        entry(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flag, value",
    [("--reps", "0"), ("--fresh-mib", "-8"), ("--experts", "x"), ("--threshold", "1.5"),
     ("--d-model", "0"), ("--tokens", "100"), ("--matmul-size", "128")],
)  # fmt: skip
def test_grouped_breakdown_refuses_bad_flags_in_one_line(flag, value, capsys):
    err = _refusal(grouped_breakdown.parse_args, [flag, value], capsys)
    assert (f"argument {flag}" in err or "unrecognized arguments" in err) and value in err, err


@pytest.mark.parametrize(
    "argv, message",
    [(["--tokens", "100", "--seq-len", "64"], "argument --tokens: 100 is not a multiple"),
     (["--reps", "0"], "argument --reps: 0 is not > 0"),
     (["--sections", "nope"], "argument --sections: invalid choice: 'nope'"),
     (["--block-sizes", "8", "-1"], "argument --block-sizes: -1 is not > 0")],
)  # fmt: skip
def test_bench_moe_refuses_bad_flags_in_one_line(argv, message, capsys):
    assert message in _refusal(bench_moe.parse_args, argv, capsys)


@pytest.mark.parametrize(
    "argv, message",
    [(["--config", "nope"], "argument --config: nope is not a module"),
     (["--layers", "2,0"], "argument --layers: 2,0 is not integers >= 1"),
     (["--steps", "0"], "argument --steps: 0 is not > 0")],
)  # fmt: skip
def test_bench_compile_refuses_bad_flags_in_one_line(argv, message, capsys):
    from experiments import bench_compile

    assert message in _refusal(bench_compile.parse_args, argv, capsys)


DECODE_TINY = [
    *("--d-model", "16", "--d-ff", "32", "--experts", "4", "--batch", "1", "4"),
    *("--ks", "1", "2", "--top-p-means", "1.5", "--calib-tokens", "512", "--reps", "1"),
]


@pytest.mark.slow
def test_bench_decode_layer_reports_every_figure_and_matching_paths(tmp_path):
    from experiments import bench_decode_layer

    path = tmp_path / "decode_layer.json"
    out = bench_decode_layer.main([*DECODE_TINY, "--json", str(path)])
    assert path.exists() and out["load_before"] >= 0 and out["load_after"] >= 0
    routers = ["top-1", "top-2", "top-p 1.5"]
    got = [(r["batch"], r["router"]) for r in out["rows"]]
    assert got == [(b, r) for b in (1, 4) for r in routers]
    for row in out["rows"]:
        assert set(row["ms"]) == {"default", "decode", "grouped", "index", "ideal", "one expert",
                                  "one expert, [in, out]"}  # fmt: skip
        assert set(row["x_ideal"]) == {"default", "decode", "grouped", "index"}
        assert all(v > 0 for v in [*row["ms"].values(), *row["x_ideal"].values()]), row
        assert row["decode_gbps"] > 0 and row["ideal_gbps"] > 0 and row["scale"] > 0
        assert 1 <= row["k_mean"] <= row["union"] == len(row["union_ids"]) <= 4
        assert row["default_path"] == "decode"  # few tokens: the rule picks the decode path
        # The decode path computes what the forced grouped buffer computes.
        assert row["max_abs_diff_to_decode"]["grouped"] < 1e-5, row
    assert abs(out["rows"][2]["k_calib"] - 1.5) < 0.05  # top-p calibrated to its target
    for ratios in out["scaling"].values():
        assert ratios["top8_over_top1"] is None  # top-8 not timed
        assert ratios["top2_over_top1"] > 0 and ratios["top1_over_one_expert"] > 0
        assert ratios["in_out_over_out_in"] > 0


@pytest.mark.parametrize(
    "flags, flag, value",
    [
        (["--experts", "4", "--ks", "5"], "--ks", "5"),
        (["--top-p-means", "0.5"], "--top-p-means", "0.5"),
        (["--dtype", "float16"], "--dtype", "float16"),
        (["--batch", "0"], "--batch", "0"),
    ],
)
def test_bench_decode_layer_refuses_bad_flags_in_one_line(flags, flag, value, capsys):
    from experiments import bench_decode_layer

    err = _refusal(bench_decode_layer.parse_args, flags, capsys)
    assert f"argument {flag}" in err and value in err, err


# ----------------------------------------------------------------------------- decode


TINY_SHAPE = dict(d_model=32, d_ff=48, experts=4, top_k=2, layers=2, heads=4, kv_heads=2,
                  vocab=64, router_scale=2.0)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from experiments import make_checkpoint

    shape = make_checkpoint.CheckpointShape(**TINY_SHAPE)
    return make_checkpoint.write_checkpoint(tmp_path_factory.mktemp("ckpt"), shape)


def test_made_checkpoint_imports_with_finite_logits(tiny_checkpoint):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dynmoe_jax.pretrained import from_hf
    from experiments import make_checkpoint

    model = from_hf(tiny_checkpoint)  # every tensor named, shaped and used as Mixtral's
    cfg = model.cfg
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.vocab_size) == (
        32, 2, 4, 2, 64
    )  # fmt: skip
    assert (cfg.moe.num_experts, cfg.moe.d_ff, cfg.moe.top_k) == (4, 48, 2)
    forward = nnx.jit(lambda m, tokens_BT: m(tokens_BT))  # one compile, not one per op
    logits_BTV, _ = forward(model, jnp.arange(12, dtype=jnp.int32).reshape(2, 6))
    assert logits_BTV.shape == (2, 6, 64) and bool(jnp.all(jnp.isfinite(logits_BTV)))
    # The router alone carries the scale: the same seed gives the same experts.
    produce = make_checkpoint.producer(make_checkpoint.CheckpointShape(**TINY_SHAPE))
    sharp = make_checkpoint.CheckpointShape(**{**TINY_SHAPE, "router_scale": 4.0})
    name = "model.layers.1.block_sparse_moe.gate.weight"
    np.testing.assert_allclose(make_checkpoint.producer(sharp)(name), 2 * produce(name))
    expert = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    np.testing.assert_array_equal(make_checkpoint.producer(sharp)(expert), produce(expert))
    np.testing.assert_array_equal(model.blocks[1].ffn.w_down_EFD[...][3], produce(expert).T)


def test_made_checkpoint_runs_the_readme_example_with_its_tokenizer(tmp_path, capsys):
    import jax.numpy as jnp

    from dynmoe_jax import config as config_lib
    from dynmoe_jax.configs import pretrained as pretrained_config
    from dynmoe_jax.data import HFTokenizer
    from dynmoe_jax.pretrained import from_hf
    from experiments import make_checkpoint

    shape = make_checkpoint.CheckpointShape(**{**TINY_SHAPE, "vocab": 320})
    folder = make_checkpoint.write_checkpoint(tmp_path / "ckpt", shape)
    # README's "Bring your own MoE", as written there.
    model = from_hf(folder, router="top_p", threshold=0.5, capacity_factor=None)
    tokenizer = HFTokenizer.from_dir(folder)
    tokens = jnp.array([tokenizer.encode("Harder tasks need more experts")])
    logits, layers = model(tokens)
    assert logits.shape == (1, tokens.shape[1], 320) and len(layers["experts_per_token"]) == 2
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (320, make_checkpoint.EOS_ID)
    assert tokenizer.decode(tokenizer.encode("Harder tasks")) == "Harder tasks"
    # The command line's checks accept the folder: the vocabularies match, nothing is noted.
    c = pretrained_config.get_config()
    c.init_from = str(folder)
    config_lib.check_config(c)
    assert capsys.readouterr().err == ""


def test_a_tokenizer_fits_any_vocabulary_exactly(tmp_path):
    from dynmoe_jax.data import HFTokenizer
    from experiments import make_checkpoint

    make_checkpoint.write_tokenizer(tmp_path, 12000)  # more than the text's merges
    tokenizer = HFTokenizer.from_dir(tmp_path)  # no config.json: </s> found by its spelling
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (12000, make_checkpoint.EOS_ID)
    with pytest.raises(ValueError, match="^vocab_size=256: a byte-level tokenizer needs >= 257"):
        make_checkpoint.write_tokenizer(tmp_path, 256)


@pytest.mark.parametrize(
    "argv, flag",
    [(["--heads", "5"], "--d-model"), (["--kv-heads", "3"], "--kv-heads"),
     (["--router-scale", "0"], "--router-scale"), (["--top-k", "9"], "--top-k"),
     (["--layers", "0"], "--layers"), (["--experts", "x"], "--experts")],
)  # fmt: skip
def test_make_checkpoint_refuses_bad_values_in_one_line(argv, flag, tmp_path, capsys):
    from experiments import make_checkpoint

    err = _refusal(make_checkpoint.main, [str(tmp_path / "out"), *argv], capsys)
    assert f"argument {flag}" in err and argv[1] in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_decode_reports_positive_figures(tiny_checkpoint, tmp_path):
    import json

    from experiments import bench_decode

    path = tmp_path / "decode.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--thresholds", "0.5", "--batch", "1", "2",
            "--new", "6", "--repeats", "2", "--copy-mib", "4", "--json", str(path)]  # fmt: skip
    out = bench_decode.main(argv)
    assert json.loads(path.read_text())["rows"] == out["rows"]
    assert out["copy_gib_per_s"] > 0 and out["num_experts"] == 4 and out["moe_layers"] == 2
    # both probes ran after each timed round; the bounds are over their medians
    assert len(out["copy_gib_per_s_by_round"]) == len(out["read_gib_per_s_by_round"]) == 2
    assert out["read_gib_per_s"] == pytest.approx(np.median(out["read_gib_per_s_by_round"]))
    assert all(v > 0 for v in out["weights_mib"].values())
    rows = {(r["setting"], r["batch"]): r for r in out["rows"]}
    assert list(rows) == [("top-2 (own)", 1), ("top-2 (own)", 2), ("top-p 0.5", 1),
                          ("top-p 0.5", 2)]  # fmt: skip
    for row in out["rows"]:
        for field in ("tokens_per_s", "experts_per_token", "union_experts", "step_mib",
                      "bound_tokens_per_s", "of_bound", "read_bound_tokens_per_s",
                      "of_read_bound"):  # fmt: skip
            assert row[field] > 0, (field, row)
        step_bytes = row["step_mib"] * 2**20
        read_bound = row["batch"] * out["read_gib_per_s"] * 2**30 / step_bytes
        assert row["read_bound_tokens_per_s"] == pytest.approx(read_bound)
        assert row["of_read_bound"] == pytest.approx(row["tokens_per_s"] / read_bound)
        assert len(row["all_tokens_per_s"]) == 2
        assert 1 <= row["experts_per_token"] <= row["union_experts"] <= 4
    assert rows[("top-2 (own)", 1)]["experts_per_token"] == 2.0
    assert rows[("top-2 (own)", 1)]["union_experts"] == 2.0
    assert rows[("top-2 (own)", 2)]["union_experts"] == 3.0  # 4 * (1 - (1 - 2/4)^2)
    assert rows[("top-p 0.5", 1)]["step_mib"] < rows[("top-2 (own)", 1)]["step_mib"]
    # the peers benchmark counts a top-2 step's bytes as this one does
    model_cfg, params = bench_decode.load(tiny_checkpoint, "float32")
    steps = bench_decode_peers.step_bytes(model_cfg, params, [1, 2], 6)
    for b in (1, 2):
        assert steps[b] == pytest.approx(rows[("top-2 (own)", b)]["step_mib"] * 2**20)


@pytest.mark.slow
def test_bench_decode_config_mode_times_the_kernel_on_and_off():
    """The labels of --kernel on off (config mode), one length."""
    from experiments import bench_decode

    argv = ["--config", "tiny", "--new", "3", "--repeats", "1", "--kernel", "on", "off"]
    out = bench_decode.main(argv)
    assert [(r["kernel"], r["new_tokens"]) for r in out["rows"]] == [("on", 3), ("off", 3)]
    assert all(r["tokens_per_s"] > 0 for r in out["rows"])
    assert out["rows"][0]["ratio_to_first"] == 1.0


@pytest.mark.slow
def test_bench_decode_pairs_dtypes_and_step_pieces_are_positive(tiny_checkpoint):
    from experiments import bench_decode, bench_decode_step

    # float32 is test_bench_decode_reports_positive_figures' dtype; here the others, the
    # float32 model with bfloat16 experts with the CPU kernel on and off.
    argv = ["--checkpoint", str(tiny_checkpoint), "--thresholds", "0.5", "--batch", "2", "--new",
            "3", "--repeats", "1", "--copy-mib", "4", "--dtype", "bfloat16", "bfloat16-experts",
            "--kernel", "on"]  # fmt: skip
    out = bench_decode.main(argv)
    assert [(r["dtype"], r["setting"], r["decode_kernel"]) for r in out["rows"]] == [
        (dtype, setting, True)
        for dtype in ("bfloat16", "bfloat16-experts")
        for setting in ("top-2 (own)", "top-p 0.5")
    ]
    assert all(r["tokens_per_s"] > 0 for r in out["rows"])
    # a float32 model with bfloat16 experts reads more per step than an all-bfloat16 one
    half = {r["dtype"]: r["step_mib"] for r in out["rows"] if r["setting"].startswith("top-2")}
    assert half["bfloat16-experts"] > half["bfloat16"]
    steps = bench_decode_step.main(["--checkpoint", str(tiny_checkpoint), "--batch", "2",
                                    "--reps", "1", "--new", "3"])  # fmt: skip
    (row,) = steps["rows"]
    assert 1 <= row["union_per_layer"] <= 4 and row["loop_ms_per_step"] > 0
    assert all(ms > 0 for ms in row["ms"].values()) and row["ideal_step_ms"] > 0
    assert {"copy", "read"} <= set(row["ms"])
    read_ideal = row["ideal_step_ms"] * row["copy_gb_per_s"] / row["read_gb_per_s"]
    assert row["read_ideal_step_ms"] == pytest.approx(read_ideal)


@pytest.mark.parametrize(
    "argv, message",
    [(["--batch", "2"], "argument --batch: only with --checkpoint"),
     (["--new", "1"], "argument --new: 1 is not"), (["--repeats", "0"], "argument --repeats: 0"),
     (["--config", "nope"], "argument --config: nope"),
     (["--checkpoint", "missing"], "argument --checkpoint: path='missing'"),
     (["--checkpoint", "CKPT", "--thresholds", "1.5"], "argument --thresholds: 1.5"),
     (["--checkpoint", "CKPT", "--new", "8,16"], "argument --new: 8,16 is not one number"),
     (["--checkpoint", "CKPT", "--full_window"], "argument --full_window: only in config")],
)  # fmt: skip
def test_bench_decode_refuses_bad_flags_in_one_line(argv, message, tiny_checkpoint, capsys):
    from experiments import bench_decode

    argv = [str(tiny_checkpoint) if a == "CKPT" else a for a in argv]
    err = _refusal(bench_decode.parse_args, argv, capsys)
    assert message in err, err


def test_peer_agreement_counts_equal_rows_and_tokens():
    ours = {1: [[5, 6, 7]], 2: [[1, 2, 3], [4, 4, 4]]}
    theirs = {1: [[5, 6, 7]], 2: [[1, 2, 3], [4, 9, 4]]}
    got = bench_decode_peers.agreement(ours, theirs)
    assert got[1] == {"rows_equal": 1, "rows": 1, "tokens_equal": 3, "tokens": 3}
    assert got[2] == {"rows_equal": 1, "rows": 2, "tokens_equal": 5, "tokens": 6}


def test_peer_bound_shares_by_hand():
    """Bounds over the rounds' median bandwidths: B rows / (step bytes / bandwidth)."""
    rounds = [{"copy": 2e9, "read": 1e9}, {"copy": 4e9, "read": 3e9}, {"copy": 3e9, "read": 2e9}]
    rows = [{"batch": 1, "dynmoe_jax": 15.0, "peer": "llama.cpp", "threads": 1,
             "peer_tokens_per_s": 10.0},
            {"batch": 8, "dynmoe_jax": 40.0, "peer": "llama.cpp", "threads": 1,
             "peer_tokens_per_s": 30.0}]  # fmt: skip
    got = bench_decode_peers.bound_shares(rounds, rows, {1: 1e8, 8: 4e8})
    assert [(r["batch"], r["system"]) for r in got] == [
        (1, "dynmoe_jax"), (1, "llama.cpp"), (8, "dynmoe_jax"), (8, "llama.cpp")]  # fmt: skip
    # B = 1: 3e9 / 1e8 = 30 (copy) and 2e9 / 1e8 = 20 (read) tokens/s; B = 8: 60 and 40
    assert [(r["bound_copy"], r["bound_read"]) for r in got] == [(30, 20)] * 2 + [(60, 40)] * 2
    assert [r["of_copy_bound"] for r in got] == pytest.approx([0.5, 1 / 3, 2 / 3, 0.5])
    assert [r["of_read_bound"] for r in got] == pytest.approx([0.75, 0.5, 1.0, 0.75])


def test_read_probe_reads_the_whole_matrix_and_rates_by_the_median(monkeypatch):
    from experiments.bench import decode_bytes

    call, moved = decode_bytes.read_program(4)
    assert moved == 4 * 2**20
    # 4 MiB of float32 ones in rows of 4096: 256 rows, each summing to 4096
    np.testing.assert_array_equal(np.asarray(call()), np.full(256, 4096.0, np.float32))
    # a clock that advances 1, 3, 2 seconds over three timed calls: median 2 s
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])
    monkeypatch.setattr(decode_bytes.time, "perf_counter", lambda: next(ticks))
    assert decode_bytes.rate((lambda: None, 1000), reps=3) == 500.0


def test_bench_decode_kernel_rates_weights_against_both_probes(tmp_path):
    import json

    from experiments import bench_decode_kernel

    path = tmp_path / "kernel.json"
    argv = ["--d-model", "64", "--d-ff", "96", "--experts", "2", "--tokens", "1", "3",
            "--reps", "2", "--json", str(path)]  # fmt: skip
    out = bench_decode_kernel.main(argv)
    assert json.loads(path.read_text())["rows"] == out["rows"]
    # per dtype: 2 experts x 3 weights of 64 x 96
    assert out["weights_mib"] == {"float32": 6 * 64 * 96 * 4 / 2**20,
                                  "bfloat16": 6 * 64 * 96 * 2 / 2**20}  # fmt: skip
    assert [(r["dtype"], r["tokens_per_expert"]) for r in out["rows"]] == [
        ("float32", 1), ("float32", 3), ("bfloat16", 1), ("bfloat16", 3)]  # fmt: skip
    for r in out["rows"]:
        rate = out["weights_mib"][r["dtype"]] * 2**20 / (r["ms"] / 1e3)
        assert r["weights_gib_per_s"] == pytest.approx(rate / 2**30)
        assert r["of_read"] == pytest.approx(rate / 2**30 / out["read_gib_per_s"])
        assert r["of_copy"] == pytest.approx(rate / 2**30 / out["copy_gib_per_s"])


@pytest.mark.parametrize(
    "argv, message",
    [(["--tokens", "0"], "argument --tokens: 0 is not > 0"),
     (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
     (["--experts", "-1"], "argument --experts: -1")],
)  # fmt: skip
def test_bench_decode_kernel_refuses_bad_flags_in_one_line(argv, message, capsys):
    from experiments import bench_decode_kernel

    err = _refusal(bench_decode_kernel.parse_args, argv, capsys)
    assert message in err, err
