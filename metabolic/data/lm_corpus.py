"""A language-model corpus made ready for training: its tokenizer and its token file.

Rank 0 prepares both once (`prepare`: trains a BPE tokenizer or takes one from the cache, and
tokenizes the corpus into the token cache); every rank then loads the tokenizer and
memory-maps the file (`load`). Validation is the last `val_fraction` of the packed sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from metabolic.data import token_cache
from metabolic.data.file_cache import folder_of, folder_ready, wait_visible
from metabolic.data.text import corpus_source, iter_documents, split_train_val
from metabolic.data.token_cache import TokenRows
from metabolic.data.tokenizer import load_tokenizer, prepare_bpe
from metabolic.engine.config import ExperimentConfig

BPE_STREAM_CHARS = 50_000_000
"""Text a streamed corpus's BPE tokenizer is trained on (its first documents)."""


def documents(cfg: ExperimentConfig) -> Iterator[str]:
    d, tx = cfg.data, cfg.data.text
    return iter_documents(tx.corpus, d.path, d.hf_name, tx.text_key, tx.streaming)


def _head(docs: Iterable[str], max_chars: int) -> list[str]:
    """The first documents of `docs`, up to about max_chars characters."""
    out, total = [], 0
    for doc in docs:
        out.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return out


def sequence_cap(cfg: ExperimentConfig) -> Optional[int]:
    """With streaming, reading stops once data.limit training sequences (plus validation) are packed.
    Without, everything is packed: validation stays the corpus's last val_fraction whatever the limit."""
    d, tx = cfg.data, cfg.data.text
    return None if d.limit is None or not tx.streaming else int(d.limit / (1 - tx.val_fraction)) + 1


def token_folder(cfg: ExperimentConfig, run_dir: Path) -> tuple[Path, str]:
    """(folder of the token file, the config key that names it)."""
    return folder_of(cfg.data.cache_dir, run_dir, "tokens")


def prepare(cfg: ExperimentConfig, run_dir: Path, should_stop: Callable[[], bool] = lambda: False) -> str:
    """Rank 0: the run's tokenizer and the corpus's token file, made when missing; returns the
    file's key. Folders it made for a file that was not finished are removed again (not a
    shared cache_dir, which other runs may be creating at the same time)."""
    d, tx = cfg.data, cfg.data.text
    folder, config_key = token_folder(cfg, run_dir)
    with folder_ready(folder, config_key, shared=bool(d.cache_dir), reads_from=d.path):  # now, not after training a tokenizer
        source = dict(corpus_source(tx.corpus, d.path, d.hf_name, tx.text_key, exclude=(folder, run_dir)),
                      streaming=tx.streaming)
        if tx.tokenizer == "bpe":
            texts = (lambda: documents(cfg)) if not tx.streaming else (lambda: _head(documents(cfg), BPE_STREAM_CHARS))
            shared = None  # a trained BPE is kept per corpus and size in a cache_dir
            if d.cache_dir:
                head = BPE_STREAM_CHARS if tx.streaming else None
                shared = folder / f"bpe{tx.vocab_size}-{token_cache.digest(dict(source, head_chars=head))}"
            prepare_bpe(tx.vocab_size, texts, run_dir, shared, should_stop)
        tokenizer = load_tokenizer(tx.tokenizer, run_dir)
        cap = sequence_cap(cfg)
        max_tokens = None if cap is None else cap * tx.seq_len
        key = token_cache.cache_key(source, tokenizer, max_tokens)
        where = f" at {d.path}" if d.path else (f" {d.hf_name}" if d.hf_name else "")
        token_cache.prepare(folder, key, lambda: documents(cfg), tokenizer, max_tokens,
                            f"the {tx.corpus} corpus{where}", should_stop)
        return key


def load(cfg: ExperimentConfig, run_dir: Path, key: str):
    """Every rank: (tokenizer, train rows, validation rows) from what rank 0 prepared under `key`."""
    d, tx = cfg.data, cfg.data.text
    folder, config_key = token_folder(cfg, run_dir)
    wait_visible(lambda: token_cache.is_built(folder, key), folder, config_key, "tokenized the corpus")
    tokenizer = load_tokenizer(tx.tokenizer, run_dir)
    cap = sequence_cap(cfg)
    train, val = split_train_val(TokenRows.pack(token_cache.open_tokens(folder, key, tokenizer), tx.seq_len, cap),
                                 tx.val_fraction)
    if d.limit is not None:
        train = train[: d.limit]
    if d.eval_limit is not None:
        val = val[: d.eval_limit]
    return tokenizer, train, val
