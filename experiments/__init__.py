"""The project's experiments: benchmarks of the layer and the model, and the paper's analyses.

Every script runs from the repository root as ``python -m experiments.<name>`` and records its
figures in ``experiments/RESULTS.md`` and ``experiments/results/``.

Benchmarks (thin scripts over the harness in ``experiments/bench/``): ``bench_moe``,
``grouped_breakdown``, ``bench_decode_layer``, ``bench_decode``, ``bench_decode_step``,
``bench_decode_forms``, ``bench_decode_kernel``, ``bench_decode_peers``, ``bench_compile``,
``compare_maxtext``; ``make_checkpoint`` writes the Mixtral-shaped checkpoint ``bench_decode``
reads; ``gpu_bench.sh`` and ``gpu_train.sh`` are the prepared runs for one GPU.

Analyses: ``compare_routers``, ``difficulty``, ``sweep_threshold``, ``pretrained_top_p``, with
their shared pieces: ``variants`` (the small language models they train), ``run_cache`` (train
once, reuse the finished run), ``flops`` (FLOP arithmetic), ``stats``, ``report`` (tables and
results files), ``plots`` and ``tasks`` (the synthetic task suite). They call the library
directly: its configs, ``train``, ``plan`` and ``inference``.
"""
