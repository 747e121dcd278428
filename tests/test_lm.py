"""Language models: text sources, tokenizer, packing, HF-format save, tiny GPT-2/Llama training."""

import math
import subprocess
import sys

import pytest
import torch

from helpers import REPO, comparable, env, ok, metabolic, records, stop_at_step, summary, torchrun
from metabolic.data.text import iter_documents, pack, shakespeare_files, split_train_val, unigram_entropy
from metabolic.data.tokenizer import byte_tokenizer, train_bpe

LM_CONFIG = REPO / "configs" / "lm_tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two plays of the default corpus as local text files."""
    folder = tmp_path_factory.mktemp("corpus")
    for f in shakespeare_files()[:2]:
        (folder / f.name).write_text(f.read_text(encoding="utf-8", errors="replace")[:60000])
    return folder


def lm_args(out, corpus, *extra):
    return [str(LM_CONFIG), f"output_dir={out}", "data.text.corpus=files", f"data.path={corpus}",
            "data.text.tokenizer=byte", "data.text.seq_len=32", "model.width=32", "model.depth=2", "model.heads=2",
            "data.limit=128", "data.eval_limit=16", "train.micro_batch_size=8", "train.eval_batch_size=8",
            "train.log_every=1", "train.max_steps=4", "train.warmup_steps=2", "train.progress=false", *extra]


def test_packing_keeps_every_token_once():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    packed = pack(docs, seq_len=4, eot_id=0)
    stream = [t for d in docs for t in d + [0]]
    assert packed.shape == (len(stream) // 4, 4)
    assert packed.reshape(-1).tolist() == stream[: packed.numel()]
    capped = pack(iter(docs), seq_len=4, eot_id=0, max_sequences=2)
    assert capped.tolist() == packed[:2].tolist()
    train, val = split_train_val(packed, 0.25)
    assert torch.equal(torch.cat([train, val]), packed) and len(val) == 1


def test_bpe_training_is_deterministic(corpus):
    texts = list(iter_documents("files", str(corpus)))
    a, b = train_bpe(texts, 400), train_bpe(texts, 400)
    assert a.get_vocab() == b.get_vocab() and len(a) == 400
    sample = texts[0][:2000]
    ids = a(sample)["input_ids"]
    assert ids == b(sample)["input_ids"] and a.decode(ids) == sample
    assert len(ids) < 0.7 * len(sample.encode())  # even 143 merges compress English text


def test_byte_tokenizer_roundtrip():
    tok = byte_tokenizer()
    ids = tok("Fair is foul, and foul is fair — ünïcode")["input_ids"]
    assert max(ids) < 256 and tok.decode(ids) == "Fair is foul, and foul is fair — ünïcode"
    assert len(tok) == 257 and tok.eos_token_id == 256


def test_text_source_reads_local_files_through_datasets(tmp_path, corpus):
    import datasets  # a declared dependency: missing is a failure, not a skip

    direct = list(iter_documents("files", str(corpus)))
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"body": direct}).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    via_hf = list(iter_documents("hf", str(tmp_path / "pq"), text_key="body"))
    assert via_hf == direct
    lines = list(iter_documents("hf", str(corpus), streaming=True))  # the `text` builder: one row per line
    assert len(lines) > 100 and "".join(lines).replace("\n", "") == "".join(direct).replace("\n", "")
    with pytest.raises(ValueError, match="data.text.text_key"):
        next(iter_documents("hf", str(tmp_path / "pq"), text_key="text"))
    # what load_dataset(name).save_to_disk(folder) writes: a DatasetDict folder
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": direct})}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents("hf", str(tmp_path / "dd"), text_key="body")) == direct
    # a recursive glob also matches folders: only files are read
    assert list(iter_documents("files", str(corpus) + "/**")) == direct


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([[0, 1, 0, 1]]), 4) == pytest.approx(math.log(2))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_save_loads_back_with_equal_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM

    from metabolic.engine.config import ModelConfig
    from metabolic.models.lm import build_causal_lm, save_hf

    torch.manual_seed(0)
    model = build_causal_lm(ModelConfig(name=name, width=32, depth=2, heads=2), vocab_size=257, seq_len=16, eos_id=256)
    save_hf(model, byte_tokenizer(), tmp_path / "hf", is_main=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ids = torch.randint(0, 257, (2, 16))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids), loaded(input_ids=ids).logits, atol=1e-5)


def test_data_limit_does_not_move_the_validation_set(tmp_path, corpus):
    # Without streaming, validation is the corpus's last val_fraction whatever data.limit is, so
    # runs with different limits are evaluated on the same sequences.
    from metabolic.engine.build import build_lm_task
    from metabolic.engine.config import load_config

    def task(limit):
        cfg = load_config(LM_CONFIG, lm_args(tmp_path / "run", corpus, f"data.limit={limit}", "data.eval_limit=null")[1:])
        return build_lm_task(cfg, torch.device("cpu"), tmp_path / f"t{limit}")

    small, full = task(16), task("null")
    assert small.num_train == 16 and full.num_train > 16
    assert torch.equal(small.val.load(), full.val.load()) and torch.equal(small.train.load(), full.train[:16].load())


def test_streamed_corpus_trains_bpe_on_its_head_and_stops_at_the_limit(tmp_path, corpus, monkeypatch):
    # A stream may be larger than memory: BPE sees its first documents only, and packing stops
    # once data.limit training sequences (and their validation share) are filled.
    import metabolic.data.tokenizer as tokenizer
    from metabolic.engine import build
    from metabolic.data import lm_corpus
    from metabolic.engine.config import load_config

    seen = []
    real_train_bpe = tokenizer.train_bpe
    monkeypatch.setattr(tokenizer, "train_bpe",
                        lambda texts, size: seen.append(list(texts)) or real_train_bpe(seen[-1], size))
    monkeypatch.setattr(lm_corpus, "BPE_STREAM_CHARS", 2000)
    cfg = load_config(LM_CONFIG, lm_args(tmp_path / "run", corpus, "data.text.corpus=hf", "data.text.streaming=true",
                                         "data.text.tokenizer=bpe", "data.text.vocab_size=300", "data.limit=20")[1:])
    task = build.build_lm_task(cfg, torch.device("cpu"), tmp_path / "run")
    lines = list(iter_documents("hf", str(corpus), streaming=True))
    texts = seen[0]
    assert texts == lines[: len(texts)] and len(texts) < len(lines)
    assert sum(map(len, texts)) >= 2000 > sum(map(len, texts[:-1]))
    assert task.num_train == 20 and 1 <= len(task.val) <= 2  # the whole corpus would fill eval_limit=16


def test_tiny_gpt2_trains_single_process_and_saves_hf(tmp_path, corpus):
    out = tmp_path / "gpt2"
    ok(metabolic("train", *lm_args(out, corpus)))
    first = records(out)[0]
    assert abs(first["train/loss"] - math.log(257)) < 0.5, first["train/loss"]
    s = summary(out)
    assert s["step"] == 4 and s["data/tokens"] == 4 * 8 * 32 and s["time/tokens_per_s"] > 0
    assert s["eval/perplexity"] == pytest.approx(math.exp(s["eval/loss"]))
    assert s["energy/metabolic"] >= s["energy/metabolic_min"] > 0
    # The saved model scores the validation split exactly as the run did.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metabolic.engine.task import LanguageModeling

    model = AutoModelForCausalLM.from_pretrained(str(out / "hf_model")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "hf_model"))
    docs = (tok(d, add_special_tokens=False)["input_ids"] for d in iter_documents("files", str(corpus)))
    _, val = split_train_val(pack(docs, 32, tok.eos_token_id), 0.05)
    val = val[:16]
    task = LanguageModeling(val, val, len(tok), torch.device("cpu"))
    with torch.no_grad():
        sums = task.eval_sums(model(input_ids=val).logits, val, torch.ones(len(val), dtype=torch.bool))
    assert task.eval_metrics(sums)["eval/loss"] == pytest.approx(s["eval/loss"], rel=1e-4)


    # Fine-tuning from the saved folder (what a hub name gives online): it starts where the run ended.
    tuned = tmp_path / "tuned"
    pre = [f"model.pretrained={out / 'hf_model'}", f"data.text.tokenizer={out / 'hf_model'}"]
    ok(metabolic("train", *lm_args(tuned, corpus, *pre, "train.max_steps=1")))
    assert records(tuned)[0]["train/loss"] < first["train/loss"] - 0.3
    too_long = metabolic("train", *lm_args(tmp_path / "long", corpus, *pre, "data.text.seq_len=64"))
    assert too_long.returncode == 2 and "Traceback" not in too_long.stderr
    assert "metabolic: error: config key 'data.text.seq_len'" in too_long.stderr and "32 positions" in too_long.stderr
    wrong_tok = metabolic("train", *lm_args(tmp_path / "tok", corpus, pre[0]))  # lm_args' byte tokenizer
    assert wrong_tok.returncode == 2 and "data.text.tokenizer" in wrong_tok.stderr


def test_resume_with_dropout_equals_uninterrupted(tmp_path, corpus):
    """GPT-2's dropout draws from the device's RNG (the CUDA one on a GPU), which the checkpoint
    carries, so a run stopped mid-way and resumed draws the same masks as one never stopped."""
    from metabolic.engine.config import load_config
    from metabolic.models.lm import lm_config

    cfg = load_config(LM_CONFIG, lm_args(tmp_path / "run", corpus)[1:])
    assert lm_config(cfg.model, 257, 32, 256).resid_pdrop > 0  # else this test proves nothing
    # 10 epochs of 16 steps: long enough for the stop to land mid-run, short on CPU and GPU
    args = lm_args(None, corpus, "train.max_steps=null", "train.epochs=10", "train.log_every=4")[2:]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(metabolic("train", str(LM_CONFIG), f"output_dir={full}", *args))
    stop_at_step([str(LM_CONFIG), *args], cut, step=8)
    stopped = records(cut)[-1]["step"]
    assert 8 <= stopped < 160, stopped
    ok(metabolic("train", str(LM_CONFIG), f"output_dir={cut}", *args, "resume=true"))
    loss = lambda run: {r["step"]: r["train/loss"] for r in records(run) if r.get("train/loss") is not None}
    losses, expected = loss(cut), loss(full)
    assert len(expected) >= 40 and losses.keys() == expected.keys()
    if torch.cuda.is_available():  # cuDNN/cuBLAS reductions may differ in the last bits run to run
        assert losses == pytest.approx(expected, rel=1e-5), [abs(losses[k] / v - 1) for k, v in expected.items()]
        assert summary(cut)["eval/loss"] == pytest.approx(summary(full)["eval/loss"], rel=1e-5)
    else:
        assert losses == expected and comparable(summary(cut)) == comparable(summary(full))


@pytest.mark.gpu
def test_gpu_run_measures_joules_with_nvml_unless_turned_off(tmp_path, corpus):
    on, off = tmp_path / "on", tmp_path / "off"
    ok(metabolic("train", *lm_args(on, corpus)))
    ok(metabolic("train", *lm_args(off, corpus, "energy.joules=false")))
    assert summary(on)["compute/mfu"] is not None  # a known peak: the run trained on the GPU
    assert summary(on)["energy/joules"] > 0 and summary(off)["energy/joules"] is None


@pytest.mark.gpu
def test_a_process_without_a_gpu_of_its_own_is_a_clear_error(tmp_path, corpus):
    # what torchrun --nproc_per_node 2 does to the second process on a one-GPU node
    gpus = torch.cuda.device_count()
    proc = subprocess.run([sys.executable, "-m", "metabolic", "train", *lm_args(tmp_path / "run", corpus)], cwd=REPO,
                          env={**env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(gpus)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"local rank {gpus} has no GPU: this node shows {gpus} CUDA device(s)" in proc.stderr


@pytest.mark.parametrize("name, stage", [("gpt2", 3), ("llama", 2), ("llama", 3)])
def test_tiny_lm_two_ranks_zero(tmp_path, corpus, name, stage):
    out = tmp_path / f"{name}_z{stage}"
    ok(torchrun(2, "-m", "metabolic", "train", *lm_args(out, corpus, f"model.name={name}",
                                                         f"deepspeed.zero_stage={stage}")))
    first = records(out)[0]
    # ZeRO-3 must initialise real weights on the partitions: step-0 loss ~ ln(vocab), not several times it.
    assert abs(first["train/loss"] - math.log(257)) < 0.5, first["train/loss"]
    s = summary(out)
    assert s["dist/world_size"] == 2 and s["data/samples_backward"] == 4 * 8 * 2
    assert s["energy/metabolic"] >= s["energy/metabolic_min"] > 0
    assert (out / "hf_model" / "config.json").is_file()
    # Zero or constant weights also give ln(vocab) at step 0: the saved matrices must still carry
    # the init's spread (std 0.02; four small steps move them by far less).
    from safetensors.torch import load_file

    weights = load_file(str(out / "hf_model" / "model.safetensors"))
    stds = sorted(float(w.float().std()) for w in weights.values() if w.dim() == 2 and w.numel() >= 1024)
    assert stds and 0.012 < stds[len(stds) // 2] < 0.03, stds


def test_vit_config_trains(tmp_path, fmnist):
    out = tmp_path / "vit"
    ok(metabolic("train", str(REPO / "configs" / "fmnist_vit.yaml"), f"output_dir={out}", "data.limit=256",
                 "data.eval_limit=128", "train.micro_batch_size=32", "train.epochs=1", "train.log_every=2",
                 "train.progress=false", "model.width=32", "model.depth=2", "model.heads=2"))
    s = summary(out)
    assert s["step"] == 8 and 0 <= s["eval/accuracy"] <= 1
    assert s["energy/metabolic"] >= s["energy/metabolic_min"] > 0 and s["compute/forward_flops_per_sample"] > 0
