"""The corpora: pydoc paragraphs, text_dir folders (recursive, bad UTF-8 replaced), the KJV and
its install hint, and the one-line errors naming a dataset."""

import shutil

import pytest

from dynmoe_jax.data import corpora
from dynmoe_jax.validation import ConfigError
from tests.data.pydoc import load


def test_pydoc_records_are_normalised_paragraphs():
    records = corpora.load_records("pydoc")
    assert len(records) > 1000
    assert all(r and r == " ".join(r.split()) for r in records)


def test_text_dir_reads_txt_files_recursively_and_replaces_bad_utf8(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Second file.\n\nIts second paragraph.\n")
    (tmp_path / "sub" / "a.txt").write_bytes(b"Caf\xe9 in Latin-1.\n")
    (tmp_path / "ignored.md").write_text("Not a txt file.")
    records = corpora.load_records(f"text_dir:{tmp_path}")
    assert records == ["Second file.", "Its second paragraph.", "Caf\ufffd in Latin-1."]


def test_kjv_missing_command_gives_install_hint():
    with pytest.raises(corpora.CorpusUnavailableError) as err:
        corpora.kjv_verses(bible_command="no-such-bible-program-xyz")
    assert str(err.value) == (
        "dataset='kjv' is invalid: allowed a corpus present on this machine (the "
        "`no-such-bible-program-xyz` command is not installed); install it with `make bible` or "
        "`apt-get install -y bible-kjv` (Debian/Ubuntu), or set --config.fallback_dataset=pydoc "
        "to train on Python's own documentation instead"
    )
    assert issubclass(corpora.CorpusUnavailableError, ConfigError)


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv is not installed")
def test_kjv_yields_all_verses_without_references():
    verses = corpora.load_records("kjv")
    assert len(verses) == 31102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert not any(corpora._VERSE_REFERENCE.match(v) for v in verses)


def test_unknown_dataset_lists_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="kjv.*pydoc.*text_dir:PATH.*TFDS"):
        load(tmp_path, dataset="no_such_corpus_xyz")


def test_text_dir_errors_name_the_path_once(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as err:
        load(tmp_path, dataset=f"text_dir:{missing}")
    assert str(err.value) == (
        f"dataset='text_dir:{missing}' is invalid: allowed text_dir:PATH naming a folder "
        f"({missing} does not exist)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, dataset=f"text_dir:{empty}")
    assert str(err.value) == (
        f"dataset='text_dir:{empty}' is invalid: allowed a folder of text (there is no "
        "non-empty .txt file under it)"
    )


def test_text_dir_that_is_a_file_is_not_a_folder(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("A file, not a folder.\n")
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "data", dataset=f"text_dir:{readme}")
    assert str(err.value) == (
        f"dataset='text_dir:{readme}' is invalid: allowed text_dir:PATH naming a folder "
        f"({readme} is not a folder)"
    )
