"""The tokenizer of a pretrained checkpoint: its ``tokenizer.json`` read by the ``tokenizers``
package (no torch, no transformers).

``HFTokenizer.from_dir(folder)`` reads ``folder/tokenizer.json`` and finds the end-of-sequence
id in this order: ``eos_token_id`` of ``folder/config.json`` (the first one, if a list), the
``eos_token`` of ``folder/tokenizer_config.json``, then the first special token of the
vocabulary spelt as one of ``EOS_TOKENS``.

Encoding adds what the checkpoint's own tokenizer adds (Mixtral's BOS ``<s>``, nothing for
OLMoE or Qwen2-MoE), so that perplexities match the way the checkpoint was trained; decoding
drops special tokens, so ``decode(encode(text)) == text`` for ordinary text.

Padding: in an HF vocabulary every id, 0 included, is a real token, so the pipeline marks
padded positions by position (``pipeline.PADDING``), never by id. ``pad_id`` is only the id the
model sees at those positions (they carry weight 0); it is the EOS id, which every checkpoint
embeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Sequence

import tokenizers

from dynmoe_jax.validation import invalid

TOKENIZER_FILE = "tokenizer.json"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# End-of-sequence spellings of the supported families (Mixtral, OLMoE, Qwen2-MoE) and a few
# common others, looked for only when neither config file names the EOS token.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|end_of_text|>")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the pipeline's interface (``data.Tokenizer``)."""

    def __init__(self, tokenizer_json: bytes, eos_token: int | str | None = None):
        """``tokenizer_json``: the bytes of a tokenizer.json; ``eos_token``: its EOS as an id
        or a token string (None: the first of ``EOS_TOKENS`` the vocabulary holds)."""
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        # A saved tokenizer may carry batch padding or truncation; the pipeline packs whole
        # records and pads by itself.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        spec = json.loads(tokenizer_json)
        if spec.get("decoder") is None and _is_byte_level(spec.get("pre_tokenizer")):
            # Without a decoder, tokens are joined as spelt: byte-level pieces such as "Ġword"
            # would reach the text. The byte-level decoder maps them back to their bytes.
            self._tokenizer.decoder = tokenizers.decoders.ByteLevel()
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = self._eos_id(vocab, eos_token)
        self.pad_id = self.eos_id
        digest = hashlib.sha256(tokenizer_json).hexdigest()[:12]
        # The EOS id is packed into the token streams, so it is part of the cache key.
        self.fingerprint = f"hf{self.vocab_size}-eos{self.eos_id}-{digest}"

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> HFTokenizer:
        """The tokenizer of a checkpoint folder (see the module docstring for the EOS)."""
        folder = pathlib.Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            invalid("init_from", str(folder), f"a checkpoint folder with {TOKENIZER_FILE}")
        return cls(path.read_bytes(), _configured_eos(folder))

    def _eos_id(self, vocab: dict[str, int], eos_token: int | str | None) -> int:
        if isinstance(eos_token, int) and 0 <= eos_token < self.vocab_size:
            return eos_token
        if isinstance(eos_token, str) and eos_token in vocab:
            return vocab[eos_token]
        if eos_token is None:
            found = [vocab[t] for t in EOS_TOKENS if t in vocab]
            if found:
                return found[0]
        allowed = (
            f"an id below the vocabulary size {self.vocab_size} or a token of the vocabulary; "
            f"without one, the vocabulary must hold one of {', '.join(EOS_TOKENS)}"
        )
        invalid("eos_token", eos_token, allowed)

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the special tokens the checkpoint's tokenizer adds
        unless ``special_tokens`` is False."""
        return self._tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text (the tokenizers package's parallel batch path)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, padding) decode to nothing."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _is_byte_level(pre_tokenizer: dict | None) -> bool:
    """Whether a tokenizer.json pre-tokenizer is ByteLevel, alone or inside a Sequence."""
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])


def _configured_eos(folder: pathlib.Path) -> int | str | None:
    """The EOS named by the checkpoint's config.json or tokenizer_config.json, if any."""
    config = _read_json(folder / MODEL_CONFIG_FILE)
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int):
        return eos
    eos = _read_json(folder / TOKENIZER_CONFIG_FILE).get("eos_token")
    if isinstance(eos, dict):  # an AddedToken written out in full
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        invalid("init_from", str(path.parent), f"a folder whose {path.name} is JSON ({e})")
    return record if isinstance(record, dict) else {}
