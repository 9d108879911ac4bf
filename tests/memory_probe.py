"""Peak memory of the input pipeline on a text_dir corpus, measured in a fresh process.

Usage: python tests/memory_probe.py CORPUS_DIR DATA_DIR OUT_JSON

Builds the corpus (TFDS ArrayRecord), tokenizes it with the byte tokenizer, then draws train
and validation batches, while a thread samples this process's anonymous resident memory
(RssAnon: heap and arrays, not the page cache of memory-mapped files) every 2 ms. Writes the
peak above the level after the imports, tracemalloc's peak (Python objects and numpy arrays)
and the corpus's token counts.
"""

import json
import sys
import threading
import time
import tracemalloc


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """Keeps the largest RssAnon seen until stopped."""

    def __init__(self, interval_s: float = 0.002):
        super().__init__(daemon=True)
        self.interval_s, self.peak, self._stop_event = interval_s, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_anon_bytes())


def main(corpus: str, data_dir: str, out: str) -> None:
    from dynmoe_jax import data as data_lib

    baseline = rss_anon_bytes()
    sampler = PeakSampler()
    sampler.start()
    tracemalloc.start()
    start = time.perf_counter()
    data = data_lib.from_config(
        dict(
            dataset=f"text_dir:{corpus}",
            data_dir=data_dir,
            tokenizer="bytes",
            seq_len=512,
            batch_size=32,
            eval_batches=20,
        )  # fmt: skip
    )
    loaded = time.perf_counter() - start
    for step in (0, 1, 2, 1000, 10**6):
        data.train_batch(step)
    data.unigram_cross_entropy()
    _, traced_peak = tracemalloc.get_traced_memory()
    peak = sampler.stop()
    result = {
        "rss_anon_baseline": baseline,
        "rss_anon_peak_above_baseline": peak - baseline,
        "tracemalloc_peak": traced_peak,
        "train_tokens": len(data.train_stream),
        "validation_tokens": len(data.validation_stream),
        "load_seconds": loaded,
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
