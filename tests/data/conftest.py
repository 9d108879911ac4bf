"""The pydoc corpus of the data tests: its cache is the session's (tests/conftest.py), whose
tiny config reads the same corpus with the same tokenizer."""

from pathlib import Path

import pytest

from tests.data.pydoc import load


@pytest.fixture(scope="session")
def pydoc_dir(data_dir) -> Path:
    """The data_dir holding the pydoc build, tokenizer and caches."""
    return Path(data_dir)


@pytest.fixture(scope="session")
def pydoc_data(pydoc_dir):
    return load(pydoc_dir)
