"""Small lm-eval tasks built from any English text, and the three that ship with the package.

From a list of paragraphs, ``build`` makes, deterministically for a seed:

* ``<prefix>_mc`` (multiple choice): the first half of a sentence, and four endings, its own
  and those of three other sentences; accuracy and length-normalised accuracy;
* ``<prefix>_gen`` (generation): a sentence without its last word, which the model must
  produce (exact match of the first word it generates, case and punctuation ignored);
* ``<prefix>_ppl`` (rolling log-likelihood): whole paragraphs; word and byte perplexity and
  bits per byte.

``write`` puts each task's documents in a JSON Lines file and its YAML beside it. The YAML reads
the file with lm-eval's ``dataset_path: json`` (an absolute path, for tasks built on a machine)
or, for the shipped tasks (``SHIPPED``, built from the English text of Python's own
``pydoc_data``, which installs with every Python), with ``custom_dataset`` (``shipped``), which
finds the file beside this module wherever the package is installed.

    python -m dynmoe_jax.lm_eval.task_files   # rebuilds the shipped tasks (a test checks them)
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "tasks"
SHIPPED_PREFIX = "dynmoe_pydoc"
KINDS = ("mc", "gen", "ppl")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(paragraphs: Sequence[str], min_words: int = 8, max_words: int = 40) -> list[str]:
    """The sentences of ``paragraphs`` with ``min_words`` to ``max_words`` words, spaces
    normalised, each once, in order."""
    seen, out = set(), []
    for paragraph in paragraphs:
        for sentence in _SENTENCE.split(" ".join(paragraph.split())):
            words = sentence.split()
            if min_words <= len(words) <= max_words and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def build(paragraphs: Sequence[str], n: int = 100, seed: int = 0) -> dict[str, list[dict]]:
    """Up to ``n`` documents of each kind (``KINDS``) from ``paragraphs``."""
    rng = random.Random(seed)
    pool = sentences(paragraphs)
    if len(pool) < 4:
        raise ValueError(f"the text holds {len(pool)} usable sentences; the tasks need >= 4")
    chosen = rng.sample(pool, min(n, len(pool)))
    return {"mc": [_choice(s, pool, rng) for s in chosen],
            "gen": [_last_word(s) for s in chosen],
            "ppl": _paragraphs(paragraphs, n, rng)}  # fmt: skip


def _choice(sentence: str, pool: list[str], rng: random.Random) -> dict:
    words = sentence.split()
    half = len(words) // 2
    others = [s for s in rng.sample(pool, min(8, len(pool))) if s != sentence][:3]
    endings = [" ".join(words[half:])] + [" ".join(o.split()[len(o.split()) // 2 :])
                                          for o in others]  # fmt: skip
    order = list(range(len(endings)))
    rng.shuffle(order)
    return {"context": " ".join(words[:half]), "choices": [endings[i] for i in order],
            "label": order.index(0)}  # fmt: skip


def _last_word(sentence: str) -> dict:
    words = sentence.split()
    return {"prompt": " ".join(words[:-1]), "answer": words[-1].strip(".,;:!?\"'()")}


def _paragraphs(paragraphs: Sequence[str], n: int, rng: random.Random) -> list[dict]:
    usable = [" ".join(p.split()) for p in paragraphs if 200 <= len(" ".join(p.split())) <= 2000]
    return [{"text": t} for t in rng.sample(usable, min(n // 4 or 1, len(usable)))]


_YAML = {
    "mc": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "gen": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "(\\\\S+)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""",
    "ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
}


def write(folder: str | Path, docs: dict[str, list[dict]], prefix: str,
          shipped: bool = False) -> list[str]:  # fmt: skip
    """Each kind's ``<prefix>_<kind>.jsonl`` and ``.yaml`` in ``folder``; the task names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for kind in KINDS:
        name = f"{prefix}_{kind}"
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs[kind]))
        if shipped:  # found beside this module wherever the package is installed
            source = (f"custom_dataset: !function dynmoe_jax.lm_eval.task_files.shipped\n"
                      f"dataset_kwargs:\n  data_files:\n    test: {data.name}\n")  # fmt: skip
        else:
            source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                      f"    test: {json.dumps(str(data.resolve()))}\n")  # fmt: skip
        header = f"task: {name}\n{source}test_split: test\n"
        footer = "metadata:\n  version: 1.0\n"
        (folder / f"{name}.yaml").write_text(header + _YAML[kind] + footer)
        names.append(name)
    return names


def shipped(data_files: dict[str, str], **_metadata):
    """lm-eval's ``custom_dataset`` of the shipped tasks: their JSON Lines files, read from
    beside this module (no dataset cache is written)."""
    import datasets

    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(
            [json.loads(line) for line in (SHIPPED / name).read_text().splitlines()]
        )
        for split, name in data_files.items()
    })  # fmt: skip


def pydoc_paragraphs() -> list[str]:
    """The English paragraphs of Python's own documentation topics (``pydoc_data``)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return [p for p in re.split(r"\n\s*\n", text) if p.strip() and not p.startswith(" ")]


def build_shipped(folder: str | Path = SHIPPED) -> list[str]:
    """The shipped example tasks, rebuilt into ``folder``."""
    return write(folder, build(pydoc_paragraphs(), n=100, seed=0), SHIPPED_PREFIX, True)


if __name__ == "__main__":
    print(", ".join(build_shipped()))
