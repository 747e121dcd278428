"""Tokenized corpora on disk: tokenize once, memory-map in every rank, every resume and every run.

Tokenizing is the slow part of starting a language-model run (hours for a large corpus), and
packed int64 tokens held in each rank's memory cost 8 bytes per token per rank. Instead rank 0
tokenizes the corpus once into a flat file of token ids (every document followed by the
end-of-text token; uint16 when the vocabulary fits, uint32 otherwise) and a JSON record of what
it holds; every rank then memory-maps the file read-only, so the ranks of a machine share one
copy in the page cache, and a resumed or requeued run starts at once.

A file is named by a key over everything that decides its content: the corpus, the size and
modification time of each of its files, the tokenizer (its serialised vocabulary and merges)
and, for a streamed corpus, how many tokens were read. Sequences of any length are cut from the
same file. Runs sharing a folder take turns, and builds are published whole (file_cache.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from metabolic.data import file_cache
from metabolic.data.file_cache import Interrupted, Progress, digest, lock_path, log, write_record, writing
from metabolic.data.idx import DatasetMissingError

__all__ = ["Interrupted", "TokenRows", "build", "cache_key", "digest", "is_built", "lock_path", "open_tokens",
           "prepare", "token_dtype"]

FORMAT = 1
"""Bump when the file layout changes: the key includes it, so old files are not read."""
WRITE_TOKENS = 1 << 20
"""Tokens buffered before each write."""
DOCS_PER_CALL = 64
"""Documents per tokenizer call (fast tokenizers encode a batch on several threads)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"token cache: a vocabulary of {vocab_size:,} ids does not fit 32 bits")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 of the tokenizer's serialised form (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def cache_key(source: dict, tokenizer, max_tokens: Optional[int]) -> str:
    """Key of the token file for `source` (corpus description with its file stats) under `tokenizer`."""
    # The end-of-text id and length live in the tokenizer's wrapper, not in its serialised form.
    return digest({"format": FORMAT, "source": source, "tokenizer": tokenizer_fingerprint(tokenizer),
                   "eot_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer), "max_tokens": max_tokens})


def paths(folder: Path, key: str) -> tuple[Path, Path]:
    """(token file, its JSON record) for `key` in `folder`."""
    return folder / f"{key}.tokens", folder / f"{key}.json"


def is_built(folder: Path, key: str) -> bool:
    """Whether a finished token file for `key` is in `folder` (the record is written last)."""
    tokens, record = paths(folder, key)
    return tokens.is_file() and record.is_file()


def prepare(folder: Path, key: str, documents: Callable[[], Iterable[str]], tokenizer,
            max_tokens: Optional[int] = None, describe: str = "corpus",
            should_stop: Callable[[], bool] = lambda: False) -> None:
    """Make sure the finished token file for `key` is in `folder`: build it while holding the
    folder's lock for `key`, or wait while another process holds it."""
    file_cache.prepare(folder, key, lambda: is_built(folder, key),
                       lambda: build(folder, key, documents(), tokenizer, max_tokens, describe, should_stop),
                       should_stop, f"tokenizing {describe}")


def build(folder: Path, key: str, documents: Iterable[str], tokenizer, max_tokens: Optional[int] = None,
          describe: str = "corpus", should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Tokenize `documents` into the token file for `key`; returns its record.

    Stops after the document that reaches `max_tokens` (as `text.pack` does with its cap).
    Prints a progress line every file_cache.PROGRESS_EVERY_S seconds; raises Interrupted
    (removing what it wrote) once `should_stop()` is true. A file another builder finished
    meanwhile is kept, not replaced.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokens_path, record_path = paths(folder, key)
    dtype = token_dtype(len(tokenizer))
    eot = tokenizer.eos_token_id
    log(f"tokenizing {describe} into {tokens_path} (once; later runs and ranks memory-map it)")
    progress = Progress()
    total, docs, pending, buffered = 0, 0, [], 0
    with writing(tokens_path) as tmp, open(tmp, "wb") as f:
        for ids in _encoded(documents, tokenizer):
            if should_stop():
                raise Interrupted(f"stopped while tokenizing {describe}; nothing was kept")
            pending.append(np.asarray(list(ids) + [eot], dtype=np.int64))
            buffered += pending[-1].size
            docs += 1
            done = max_tokens is not None and total + buffered >= max_tokens
            if buffered >= WRITE_TOKENS or done:
                total += _write(f, pending, dtype)
                pending, buffered = [], 0
            if done:
                break
            if progress.due():
                rate = (total + buffered) / max(progress.seconds, 1e-9)
                log(f"tokenizing {describe}: {docs:,} documents, {total + buffered:,} tokens ({rate:,.0f} tokens/s)")
        total += _write(f, pending, dtype)
    record = {"format": FORMAT, "dtype": dtype.name, "num_tokens": total, "documents": docs,
              "vocab_size": len(tokenizer), "eot_id": eot, "source": describe, "max_tokens": max_tokens,
              "seconds": round(progress.seconds, 3)}
    write_record(record_path, record)
    log(f"tokenized {describe}: {docs:,} documents, {total:,} tokens in {record['seconds']:.1f} s")
    return record


def _encoded(documents: Iterable[str], tokenizer) -> Iterable[Sequence[int]]:
    """Token ids of each document, in order, encoded DOCS_PER_CALL at a time."""
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == DOCS_PER_CALL:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def _write(f, parts: list[np.ndarray], dtype: np.dtype) -> int:
    if not parts:
        return 0
    ids = np.concatenate(parts)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(dtype).max):
        raise ValueError(f"token cache: token id {int(ids.max())} outside {dtype.name} (tokenizer's length is wrong)")
    f.write(ids.astype(dtype).tobytes())
    return int(ids.size)


def open_tokens(folder: Path, key: str, tokenizer=None) -> np.ndarray:
    """The flat token stream of a finished file, memory-mapped read-only (checked against
    `tokenizer` when given)."""
    tokens_path, record_path = paths(folder, key)
    record = json.loads(record_path.read_text())
    if tokenizer is not None and (record["vocab_size"], record["eot_id"]) != (len(tokenizer), tokenizer.eos_token_id):
        raise DatasetMissingError(f"token cache {tokens_path}: written for {record['vocab_size']} ids with end-of-text "
                         f"{record['eot_id']}, the tokenizer has {len(tokenizer)} and {tokenizer.eos_token_id}")
    return file_cache.map_readonly(tokens_path, np.dtype(record["dtype"]), (int(record["num_tokens"]),), record_path)


class TokenRows:
    """Packed sequences [N, L] cut from a flat token stream, without copying it.

    Row i is tokens [i*L, (i+1)*L). Indexing with a tensor of row indices reads just those rows
    into an int64 tensor; a slice gives a view, as numpy's basic indexing does.
    """

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    @classmethod
    def pack(cls, stream: np.ndarray, seq_len: int, max_sequences: Optional[int] = None) -> "TokenRows":
        """Cut `stream` into whole rows of `seq_len`; the ragged tail is dropped."""
        n = stream.shape[0] // seq_len
        if max_sequences is not None:
            n = min(n, max_sequences)
        return cls(stream[: n * seq_len].reshape(n, seq_len))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.rows.shape)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return TokenRows(self.rows[key])
        idx = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        return torch.from_numpy(self.rows[idx].astype(np.int64))

    def load(self) -> torch.Tensor:
        """Every row as one int64 tensor (small corpora and tests)."""
        return torch.from_numpy(np.asarray(self.rows).astype(np.int64))

    def token_counts(self, vocab_size: int, chunk_tokens: int = 1 << 22) -> torch.Tensor:
        """How often each token id occurs, read about chunk_tokens at a time (600 M tokens/s on one core)."""
        counts = torch.zeros(vocab_size, dtype=torch.int64)
        wide = np.int32 if self.rows.dtype.itemsize < 4 else np.int64  # bincount's fast path is int32
        step = max(1, chunk_tokens // max(self.rows.shape[1], 1))
        for start in range(0, len(self), step):
            chunk = torch.from_numpy(np.asarray(self.rows[start:start + step]).reshape(-1).astype(wide))
            counts += torch.bincount(chunk, minlength=vocab_size)[:vocab_size]
        return counts
