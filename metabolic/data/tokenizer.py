"""Tokenizers: byte-level BPE trained offline (saved in the run), raw bytes, or from_pretrained."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from metabolic.data.file_cache import Interrupted, tmp_name
from metabolic.data.text import EOT
from metabolic.engine.config import ConfigError


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`; deterministic for the same texts and size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOT, bos_token=EOT, unk_token=EOT)


def byte_tokenizer():
    """256 byte tokens plus EOT, with no training: the tokenizer that needs nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab[EOT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.ByteFallback()
    tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT)


def _publish(write: Callable[[Path], object], target: Path) -> None:
    """Write a folder under a temporary name beside `target`, then rename it into place: a
    half-written tokenizer never passes for one. A target another process published first is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(target)
    try:
        write(tmp)
        try:
            os.rename(tmp, target)  # replaces an empty folder, not a finished one
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_bpe(vocab_size: int, texts_fn: Callable[[], Iterable[str]], run_dir: Path,
                shared: Optional[Path] = None, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Rank 0: make sure the run has its BPE tokenizer in `run_dir/tokenizer` (kept on resume).

    shared: where a BPE tokenizer trained on the same corpus with the same size is kept between
    runs (data.cache_dir); it is copied into the run instead of training again, or put
    there after training. A stop seen while the trainer reads the corpus raises Interrupted
    (the merges computed after reading are not interrupted).
    """
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return
    if shared is not None and (shared / "tokenizer.json").is_file():
        print(f"[metabolic] using the BPE tokenizer trained on this corpus before, from {shared}", file=sys.stderr)
        _publish(lambda tmp: shutil.copytree(shared, tmp), saved)
        return
    print(f"[metabolic] training a BPE tokenizer of {vocab_size} ids on the corpus", file=sys.stderr, flush=True)
    bpe = train_bpe(_until_stopped(texts_fn(), should_stop), vocab_size)
    _publish(lambda tmp: bpe.save_pretrained(str(tmp)), saved)
    if shared is not None:
        _publish(lambda tmp: shutil.copytree(saved, tmp), shared)


def _until_stopped(texts: Iterable[str], should_stop: Callable[[], bool]) -> Iterator[str]:
    for text in texts:
        if should_stop():  # raised through the tokenizers library, which stops reading
            raise Interrupted("stopped while training the BPE tokenizer; nothing was kept")
        yield text


def load_tokenizer(spec: str, run_dir: Path):
    """The run's tokenizer. spec: "bpe" (the one prepare_bpe put in `run_dir/tokenizer`), "byte",
    or a local path / hub name for AutoTokenizer.from_pretrained."""
    from transformers import AutoTokenizer

    if spec == "bpe":
        return AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    if spec == "byte":
        return byte_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as err:
        raise ConfigError(f"config key 'data.text.tokenizer': cannot load tokenizer '{spec}' "
                          f"({type(err).__name__}: {err})") from err
    if tok.eos_token_id is None:
        raise ConfigError(f"config key 'data.text.tokenizer': tokenizer '{spec}' has no eos token to join documents")
    return tok
