"""Text corpora selected by a name string.

Every corpus is a finite sequence of *records*: short strings such as one Bible verse or one
paragraph of documentation. Whitespace inside a record is collapsed to single spaces because the
tokenizers normalise it anyway; doing it up front makes ``decode(encode(record)) == record``.

Names understood by :func:`load_records`:

* ``kjv``: the King James Bible, one verse per record, read from the ``bible`` command of the
  Debian package ``bible-kjv``.
* ``pydoc``: the Python reference topics shipped with CPython (``pydoc_data.topics``), one
  paragraph per record. Always available, no download.
* ``text_dir:PATH``: every ``*.txt`` file under ``PATH`` (recursive), one paragraph per record.

Any other name is a TFDS text dataset (``lm1b``, ``c4/en``, ...); see :func:`tfds_records`.
"""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from dynmoe_jax.validation import ConfigError, invalid, message

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

KJV = "kjv"
PYDOC = "pydoc"
TEXT_DIR_PREFIX = "text_dir:"
LOCAL_CORPORA = (KJV, PYDOC)
TFDS_TEXT_FEATURE = "text"

VALID_CHOICES = (
    f"'{KJV}' | '{PYDOC}' | '{TEXT_DIR_PREFIX}PATH' "
    "| a TFDS text dataset with a 'text' feature (e.g. 'lm1b')"
)
LOCAL_CHOICES = f"'{KJV}' | '{PYDOC}' | '{TEXT_DIR_PREFIX}PATH' (the local corpora)"

KJV_INSTALL_HINT = "install it with `make bible` or `apt-get install -y bible-kjv` (Debian/Ubuntu)"

# `bible` prints "Ge1:1 In the beginning ..."; the book abbreviation can itself contain digits
# ("1Co13:4"), so the reference is any non-space run ending in chapter:verse.
_VERSE_REFERENCE = re.compile(r"^\S+\d+:\d+\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class CorpusUnavailableError(ConfigError):
    """A corpus needs a program or files that are not present on this machine.

    The only error that lets a config's ``fallback_dataset`` take over. ``dataset``, ``reason``
    (what is missing) and ``install_hint`` are kept for the fallback's warning.
    """

    def __init__(self, dataset: str, reason: str, install_hint: str):
        allowed = (
            f"a corpus present on this machine ({reason}); {install_hint}, or set "
            f"--config.fallback_dataset={PYDOC} to train on Python's own documentation instead"
        )
        super().__init__(message("dataset", dataset, allowed))
        self.dataset, self.reason, self.install_hint = dataset, reason, install_hint


def normalize_whitespace(text: str) -> str:
    """Collapses every run of whitespace to one space and strips both ends."""
    return " ".join(text.split())


def split_paragraphs(text: str) -> list[str]:
    """Splits text at blank lines into whitespace-normalised, non-empty paragraphs."""
    paragraphs = (normalize_whitespace(p) for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in paragraphs if p]


def is_text_dir(name: str) -> bool:
    """Whether ``name`` selects a folder of .txt files."""
    return name.startswith(TEXT_DIR_PREFIX)


def is_local_corpus(name: str) -> bool:
    """Whether ``name`` is built locally (kjv, pydoc, text_dir:) rather than read from TFDS."""
    return name in LOCAL_CORPORA or is_text_dir(name)


def text_dir_path(name: str) -> pathlib.Path:
    """The absolute folder named by a ``text_dir:PATH`` corpus name; it must exist."""
    raw = name[len(TEXT_DIR_PREFIX) :]
    if not raw:
        invalid("dataset", name, "text_dir:PATH naming a folder, e.g. 'text_dir:/data/books'")
    folder = pathlib.Path(raw).expanduser().resolve()
    check_text_dir(folder, name)
    return folder


def kjv_verses(bible_command: str = "bible") -> list[str]:
    """All 31,102 verses of the King James Bible, without their references.

    Raises:
      CorpusUnavailableError: if the ``bible`` program is missing or prints nothing.
    """
    executable = shutil.which(bible_command)
    if executable is None:
        _kjv_unavailable(f"the `{bible_command}` command is not installed")
    # stdin is closed because `bible` drops into an interactive prompt when it can read a tty.
    result = subprocess.run(
        [executable, "-f", "gen1:1-rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    text = result.stdout.decode("utf-8", errors="replace")
    verses = [normalize_whitespace(_VERSE_REFERENCE.sub("", line)) for line in text.splitlines()]
    verses = [v for v in verses if v]
    if result.returncode != 0 or not verses:
        stderr = " ".join(result.stderr.decode("utf-8", errors="replace").split())
        _kjv_unavailable(
            f"`{executable} -f gen1:1-rev22:21` printed no verses "
            f"(exit code {result.returncode}{': ' + stderr if stderr else ''})"
        )
    return verses


def _kjv_unavailable(reason: str) -> NoReturn:
    raise CorpusUnavailableError(KJV, reason, KJV_INSTALL_HINT)


def pydoc_paragraphs() -> list[str]:
    """Paragraphs of CPython's pydoc topics (English prose), sorted by topic."""
    from pydoc_data.topics import topics  # stdlib; imported lazily: a large module of strings

    return [p for key in sorted(topics) for p in split_paragraphs(topics[key])]


def text_dir_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The ``*.txt`` files under ``folder`` (recursive), in sorted path order: the record order."""
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def file_paragraphs(path: pathlib.Path) -> list[str]:
    """The paragraphs of one text file (a local corpus is read one file at a time)."""
    # Real-world folders hold the odd Latin-1 file; a replacement character beats a crash.
    return split_paragraphs(path.read_bytes().decode("utf-8", errors="replace"))


def text_dir_paragraphs(folder: pathlib.Path) -> list[str]:
    """Paragraphs of every ``*.txt`` file under ``folder``, files in sorted path order.

    Raises:
      ConfigError: if the folder does not exist or holds no non-empty .txt file.
    """
    check_text_dir(folder)
    paragraphs = [p for path in text_dir_files(folder) for p in file_paragraphs(path)]
    if not paragraphs:
        _empty_text_dir(folder)
    return paragraphs


def check_text_dir(folder: pathlib.Path, name: str = "") -> None:
    """Raises a ConfigError naming ``name`` (default ``text_dir:folder``) unless ``folder`` is
    an existing folder, saying whether the path is missing or is something else."""
    if folder.is_dir():
        return
    problem = "is not a folder" if folder.exists() else "does not exist"
    invalid("dataset", name or f"{TEXT_DIR_PREFIX}{folder}",
            f"text_dir:PATH naming a folder ({folder} {problem})")  # fmt: skip


def _empty_text_dir(folder: pathlib.Path) -> NoReturn:
    name = f"{TEXT_DIR_PREFIX}{folder}"
    invalid("dataset", name, "a folder of text (there is no non-empty .txt file under it)")


def record_parts(name: str) -> list[Callable[[], list[str]]]:
    """A local corpus as consecutive parts, each a callable giving that part's records.

    A ``text_dir`` corpus has one part per file, so a reader holds one file at a time whatever
    the corpus size; kjv and pydoc (a few MB) are one part. Concatenated, the parts are
    :func:`load_records`.
    """
    if is_text_dir(name):
        folder = text_dir_path(name)
        return [functools.partial(file_paragraphs, path) for path in text_dir_files(folder)]
    return [functools.partial(load_records, name)]


def load_records(name: str) -> list[str]:
    """All records of a local corpus (``kjv``, ``pydoc`` or ``text_dir:PATH``), in a fixed order.

    Raises:
      ConfigError: for a name that is not a local corpus, or an empty corpus.
      CorpusUnavailableError: if the corpus needs something that is not installed.
    """
    if name == KJV:
        records = kjv_verses()
    elif name == PYDOC:
        records = pydoc_paragraphs()
    elif is_text_dir(name):
        records = text_dir_paragraphs(text_dir_path(name))
    else:
        invalid("dataset", name, LOCAL_CHOICES)
    if not records:
        invalid("dataset", name, "a corpus holding text (this one is empty)")
    return records


def _decode_text(value: object) -> str:
    """A TFDS text feature as ``str`` (data sources give bytes, mocks give str)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):  # a numpy scalar of dtype object/bytes
        return _decode_text(value.item())
    return str(value)


def _read_examples(source: Sequence[dict], keys: range) -> Iterator[dict]:
    """Examples ``keys`` of a data source, one at a time.

    One at a time, not through ``__getitems__``: that path starts a thread pool per call, and
    the per-thread malloc arenas kept growing the resident memory with the records read, where
    reading one by one stays flat. The cost is read speed on short records, paid once per
    corpus build.
    """
    for key in keys:
        yield source[key]


def records_from_source(
    source: Sequence[dict], name: str, limit: int | None = None, stride: int = 1
) -> Iterator[str]:
    """Normalised, non-empty ``text`` records of a TFDS data source, in index order.

    ``limit``: read only the first ``limit`` examples; ``stride``: only every stride-th of them.
    """
    count = len(source) if limit is None else min(limit, len(source))
    for example in _read_examples(source, range(0, count, stride)):
        if TFDS_TEXT_FEATURE not in example:
            invalid(
                "dataset",
                name,
                f"a dataset with a '{TFDS_TEXT_FEATURE}' feature (this one has {sorted(example)})",
            )
        text = normalize_whitespace(_decode_text(example[TFDS_TEXT_FEATURE]))
        if text:
            yield text


def tfds_split_name(available: Iterable[str], split: str) -> str:
    """Maps our ``validation`` split to ``test`` for datasets that have no validation split."""
    available = list(available)
    if split == "validation" and "validation" not in available and "test" in available:
        return "test"
    return split


def check_tfds_name(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder for ``name``, or raises a ConfigError listing the valid choices."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        invalid("dataset", name, VALID_CHOICES)


def tfds_source(name: str, split: str, data_dir: str | None) -> Sequence[dict]:
    """A random-access source of one split of a TFDS dataset (downloads and prepares if needed).

    Args:
      name: TFDS name, optionally with config and version (``c4/en``, ``lm1b:1.1.0``).
      split: ``train`` or ``validation`` (``test`` is used when there is no validation split).
      data_dir: where TFDS keeps its files; ``None`` for the TFDS default.
    """
    import tensorflow_datasets as tfds

    builder = check_tfds_name(name, data_dir)
    split_names = list(builder.info.splits) or [split]
    return tfds.data_source(name, split=tfds_split_name(split_names, split), data_dir=data_dir)


def no_records(name: str, split: str = "train") -> NoReturn:
    """Raises the ConfigError of a corpus (or one split of it) that holds no text."""
    if is_text_dir(name):
        _empty_text_dir(text_dir_path(name))
    if is_local_corpus(name):
        invalid("dataset", name, "a corpus holding text (this one is empty)")
    invalid("dataset", name, f"a dataset whose {split!r} split holds text (it holds none)")
