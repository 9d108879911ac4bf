"""The benchmark harness every script of ``experiments/`` times with.

* ``harness``: ``Bench`` (AOT compilation, interleaved timing, medians, compile seconds, XLA
  temp bytes), load averages and the JSON writer;
* ``layers``: the MoE layer of a given shape, router and dispatch from the public API, its
  forward+backward program, and ``calibrate`` (a router scaled to a target mean k);
* ``dense``: the dense SwiGLU ideal and the machine's matmul rate;
* ``layer_bench``: MoE-layer cases at one shape beside their dense ideal;
* ``flags``: command-line types and flags the scripts share;
* ``moe_sweeps``, ``moe_probes``: the sections of ``bench_moe``;
* ``decode_bytes``: what a decode step reads, and the copy and read bandwidths
  (``bench_decode`` and the other decode benchmarks).
"""
