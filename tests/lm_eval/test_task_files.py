"""The example tasks: the shipped files are what the builder makes from pydoc_data, and each
kind of document is what its task needs."""

import json
from pathlib import Path

import yaml

from dynmoe_jax.lm_eval import task_files

PARAGRAPHS = [
    "The first sentence has exactly eight words in it. A second sentence is here with more "
    "words than the first one had. Short one.",
    "Another paragraph brings another sentence of decent length to the pool. And yet one more "
    "sentence is added so that there are enough of them. The fifth sentence closes the text "
    "with a final word.",
]


def test_the_shipped_tasks_are_the_builders_output(tmp_path):
    names = task_files.build_shipped(tmp_path)
    assert names == ["dynmoe_pydoc_mc", "dynmoe_pydoc_gen", "dynmoe_pydoc_ppl"]
    for path in tmp_path.iterdir():
        assert (task_files.SHIPPED / path.name).read_text() == path.read_text(), path.name


def test_documents_hold_what_their_tasks_need():
    docs = task_files.build(PARAGRAPHS, n=10, seed=1)
    pool = task_files.sentences(PARAGRAPHS)
    assert len(pool) == 5  # "Short one." is too short
    for doc in docs["mc"]:
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        whole = f"{doc['context']} {doc['choices'][doc['label']]}"
        assert whole in pool
    for doc in docs["gen"]:
        sentence = next(s for s in pool if s.startswith(doc["prompt"] + " "))
        assert sentence.split()[-1].strip(".") == doc["answer"]
    assert docs == task_files.build(PARAGRAPHS, n=10, seed=1)  # deterministic


def test_tasks_written_for_a_machine_read_their_json_lines_by_absolute_path(tmp_path):
    docs = task_files.build(PARAGRAPHS, n=10, seed=0)
    docs["ppl"] = [{"text": PARAGRAPHS[0]}]
    names = task_files.write(tmp_path, docs, "held_out")
    for name in names:
        config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        assert config["task"] == name and config["dataset_path"] == "json"
        data = config["dataset_kwargs"]["data_files"]["test"]
        lines = Path(data).read_text().splitlines()
        assert [json.loads(line) for line in lines] == docs[name.rpartition("_")[2]]


def test_the_shipped_loader_reads_the_files_beside_the_module():
    dataset = task_files.shipped({"test": "dynmoe_pydoc_mc.jsonl"}, pretrained="ignored")
    assert len(dataset["test"]) == 100
    assert set(dataset["test"][0]) == {"context", "choices", "label"}
