"""Typed experiment configuration: dataclass schema + OmegaConf YAML + dotlist overrides.

Every field carries a one-line docstring (the string literal under it). Validation happens
before anything is written, and every error names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "resnet_small"
    """Model: resnet_small, resnet18, mlp, vit (classifiers); gpt2, llama (causal LMs)."""
    width: int = 32
    """Channels of the first stage (CNN), hidden units (MLP), hidden size (ViT, LMs)."""
    depth: int = 2
    """Residual blocks per stage (resnet_small; resnet18 has 2), hidden layers (MLP), layers (ViT, LMs)."""
    heads: int = 4
    """Attention heads (ViT, LMs)."""
    mlp_ratio: int = 4
    """Feed-forward width / hidden size (ViT, LMs)."""
    patch_size: int = 4
    """ViT patch size in pixels."""
    pretrained: Optional[str] = None
    """LMs: load weights with from_pretrained from this local path or hub name (null = from config)."""
    vocab_size: Optional[int] = None
    """LMs: pad the embedding to this many tokens (e.g. 50257 for GPT-2 sizes; null = the tokenizer's)."""


@dataclass
class TextConfig:
    corpus: str = "shakespeare"
    """Text source: shakespeare (offline default corpus), files (data.path: file, folder or glob), hf."""
    text_key: str = "text"
    """Column holding the text for corpus=hf."""
    streaming: bool = False
    """corpus=hf: stream the corpus instead of downloading it whole (needs data.limit)."""
    tokenizer: str = "bpe"
    """bpe (byte-level BPE trained offline and saved in the run), byte, or a local path / hub name."""
    vocab_size: int = 4096
    """Vocabulary size of a trained BPE tokenizer."""
    seq_len: int = 128
    """Tokens per packed sequence."""
    val_fraction: float = 0.05
    """Fraction of packed sequences held out for validation (the last ones)."""


@dataclass
class DataConfig:
    source: str = "idx"
    """Dataset source: idx (IDX files), hf (Hugging Face datasets) or text (language models, see data.text)."""
    path: Optional[str] = "/usr/share/datasets/fashion-mnist"
    """IDX folder; source=hf: local dataset folder (null to use data.hf_name); text: corpus files."""
    hf_name: Optional[str] = None
    """Hub dataset name for source=hf when online (e.g. zalando-datasets/fashion_mnist)."""
    image_key: str = "image"
    """Column holding the image for source=hf."""
    label_key: str = "label"
    """Column holding the label for source=hf."""
    image_size: Optional[int] = None
    """source=hf: resize each image's shorter side to this many pixels and centre-crop it square
    while decoding (null: keep the sizes, which must all be equal)."""
    decode_threads: int = 0
    """source=hf: threads rank 0 decodes images with when it fills the image cache (0: one per
    CPU core, at most 8, for images of 32 KiB or more decoded, else 1)."""
    limit: Optional[int] = None
    """Use only the first N training samples (null = all)."""
    eval_limit: Optional[int] = None
    """Use only the first N test samples for evaluation (null = all)."""
    augment: bool = True
    """Random-crop + horizontal-flip augmentation of training images."""
    policy: str = "full"
    """Sample-selection policy: full, pdd_difficulty, lazy (pdd_difficulty with tau 0), pdd_random,
    pdd_matched, infobatch, price."""
    tau: float = 0.5
    """pdd_difficulty / pdd_matched: keep a sample while p(y|x) < tau (0: misclassified only)."""
    gamma: float = 0.95
    """pdd_random: keep ceil(gamma^t * N) random samples in epoch t."""
    prune_ratio: float = 0.5
    """infobatch: probability r of pruning a below-mean-loss sample (kept ones weigh 1/(1-r))."""
    anneal: float = 0.875
    """infobatch: prune only in epochs t < anneal * epochs (InfoBatch's delta); full data after."""
    price: float = 0.0
    """price: initial threshold on the gradient proxy (an external controller moves it)."""
    price_proxy: str = "gap"
    """price: gradient-magnitude proxy, gap (1 - p(y|x)) or loss (language models)."""
    revision_epochs: int = 0
    """Final epochs that train on all data (every policy)."""
    refresh: Optional[bool] = None
    """Re-score samples not trained on last epoch with a no-grad forward before planning
    (null: the policy's default, on for pdd_difficulty/lazy/pdd_matched)."""
    screen: bool = False
    """pdd_difficulty / lazy / price: screen every micro-batch with a no-grad forward at the current
    weights and train only on the samples the rule keeps now (as published PDD decides per batch)."""
    relative_scores: bool = True
    """Rescale stored losses by the running loss level at recording time (stale-score drift)."""
    score_table: str = "auto"
    """Per-sample score table: replicated (every rank holds every row), sharded (each rank the rows
    it owns, index mod world), or auto (sharded once a replica would exceed 200 M rows)."""
    cache_dir: Optional[str] = None
    """Folder of prepared data (decoded source=hf images, tokenized corpora), reused by every run that
    prepares the same data the same way (null: <output_dir>/images or /tokens); on several machines,
    one they all see."""
    text: TextConfig = field(default_factory=lambda: TextConfig())
    """Text corpus, tokenizer and packing (language models)."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Nominal training epochs."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (null = no limit)."""
    micro_batch_size: int = 128
    """Samples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    eval_batch_size: Optional[int] = None
    """Samples per rank per evaluation forward (null = 2 x micro_batch_size)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = at the end of each epoch only)."""
    log_every: int = 20
    """Reduce the ledger across ranks and write metrics every N steps."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0 = at epoch ends and at the end only)."""
    grad_clip: float = 0.0
    """Gradient clipping norm (0 = off)."""
    bf16: bool = False
    """Train in bf16 with fp32 master weights."""
    lr_schedule: str = "cosine"
    """Learning-rate schedule: constant or cosine (with linear warmup)."""
    warmup_steps: int = 50
    """Linear warmup steps for the learning rate."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    collective_timeout_s: Optional[float] = None
    """Seconds a rank waits in a collective for the others before the run fails (null: DeepSpeed's
    default, 10 minutes or DEEPSPEED_TIMEOUT minutes); raise it when a large model's checkpoints write slowly."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    """Optimizer: adamw (torch), sgd (torch), masked_adamw, masked_sgd."""
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam moment coefficients."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    select: str = "dense"
    """Masked optimizers: which synapses change (dense, topk, hard, soft, random, block)."""
    fraction: float = 1.0
    """Target fraction of weights changed per step (topk, random, block)."""
    price: float = 0.0
    """Energy price lambda for the hard/soft threshold rules."""
    count_price: float = 0.0
    """select=soft: extra price per changed weight, so small shrunk updates wait (0: plain soft)."""
    residual: bool = False
    """Keep unselected updates in a residual added to the next step (error feedback)."""
    residual_decay: float = 1.0
    """Fraction of the residual kept per step: 1 keeps all, below 1 it fades (synaptic caching)."""
    block_size: int = 4096
    """Contiguous elements per block for select=block."""
    dense_1d: bool = False
    """Masked optimizers: update 1-D tensors (biases, norm scales) densely, select the rest."""
    dense_tail: float = 0.0
    """Masked optimizers: fraction of the run, at its end, with dense updates (annealing tail)."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU (ZeRO 1-3)."""


@dataclass
class EnergyConfig:
    alpha: float = 1.0
    """Exponent of the metabolic energy sum |dw|^alpha (0 counts changes)."""
    joules: bool = True
    """Read NVML/RAPL energy counters where the hardware exposes them."""
    controller: bool = False
    """One price lambda for samples (data.policy=price) and weights (optimizer.select=hard/soft)."""
    price: float = 0.01
    """Controller: initial (or, without a budget, fixed) price lambda."""
    budget: Optional[float] = None
    """Controller: metabolic energy budget met by dual ascent on lambda (null = fixed price)."""
    budget_per: str = "run"
    """Controller: the budget is for the whole run or per epoch."""
    price_step: float = 0.5
    """Controller: dual-ascent step size (log lambda moves by step * a step's relative overspend of its share)."""
    data_scale: float = 1.0
    """Controller: threshold on the sample proxy (1 - p, or loss) per unit of lambda."""
    data_units: str = "absolute"
    """Controller: 'absolute' (threshold = data_scale * lambda) or 'relative' (times mean proxy / mean |m_hat|)."""
    reprice_empty: int = 0
    """Controller: with budget left, an epoch plan that keeps no sample is re-priced (lambda / e) up to this many times."""


@dataclass
class ExperimentConfig:
    output_dir: str = "runs/default"
    """Folder for config.yaml, metrics.jsonl, summary.json, checkpoints, report.png."""
    seed: int = 0
    """Seed for weights, data order and selection."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and sample selection."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop lengths and intervals."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and weight selection."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    """Energy accounting, and the joint controller's price and budget."""


MODELS = ("resnet_small", "resnet18", "mlp", "vit", "gpt2", "llama")
LM_MODELS = ("gpt2", "llama")
SOURCES = ("idx", "hf", "text")
CORPORA = ("shakespeare", "files", "hf")
OPTIMIZERS = ("adamw", "sgd", "masked_adamw", "masked_sgd")
SELECT_RULES = ("dense", "topk", "hard", "soft", "random", "block")
SCHEDULES = ("constant", "cosine")
POLICIES = ("full", "pdd_difficulty", "lazy", "pdd_random", "pdd_matched", "infobatch", "price")
SCORE_TABLES = ("auto", "replicated", "sharded")
SCREENING_POLICIES = ("pdd_difficulty", "lazy", "price")
PRICE_PROXIES = ("gap", "loss")


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r}, expected {want}")


def _check_finite(node: Any, prefix: str = "") -> None:
    """No float anywhere in the config may be inf or nan (a rate, price or budget of inf is a typo)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            _check(not isinstance(v, float) or math.isfinite(v), prefix + f.name, value, "a finite number")


def validate(cfg: ExperimentConfig) -> None:
    """Range and choice checks that the type system cannot express."""
    _check_finite(cfg)
    _check(cfg.model.name in MODELS, "model.name", cfg.model.name, f"one of {MODELS}")
    _check(cfg.model.width >= 1, "model.width", cfg.model.width, ">= 1")
    _check(cfg.model.depth >= 1, "model.depth", cfg.model.depth, ">= 1")
    if cfg.model.name == "vit" or cfg.model.name in LM_MODELS:  # only attention has heads
        _check(cfg.model.heads >= 1 and cfg.model.width % cfg.model.heads == 0, "model.heads", cfg.model.heads,
               f">= 1 and dividing model.width={cfg.model.width}")
    _check(cfg.model.mlp_ratio >= 1, "model.mlp_ratio", cfg.model.mlp_ratio, ">= 1")
    _check(cfg.model.patch_size >= 1, "model.patch_size", cfg.model.patch_size, ">= 1")
    is_lm = cfg.model.name in LM_MODELS
    _check(is_lm == (cfg.data.source == "text"), "data.source", cfg.data.source,
           "text for language models (gpt2, llama), idx or hf for classifiers")
    tx = cfg.data.text
    # A tokenizer trained here (or bytes) numbers tokens unlike the pretrained model's embedding.
    _check(not (is_lm and cfg.model.pretrained) or tx.tokenizer not in ("bpe", "byte"), "data.text.tokenizer",
           tx.tokenizer, "the pretrained model's own tokenizer (its path or hub name) when model.pretrained is set")
    _check(tx.corpus in CORPORA, "data.text.corpus", tx.corpus, f"one of {CORPORA}")
    _check(tx.vocab_size >= 260, "data.text.vocab_size", tx.vocab_size, ">= 260")
    _check(tx.seq_len >= 2, "data.text.seq_len", tx.seq_len, ">= 2")
    _check(0 < tx.val_fraction < 1, "data.text.val_fraction", tx.val_fraction, "in (0, 1)")
    _check(not tx.streaming or cfg.data.limit is not None, "data.limit", cfg.data.limit,
           "a number of sequences when data.text.streaming is true")
    _check(cfg.data.source in SOURCES, "data.source", cfg.data.source, f"one of {SOURCES}")
    _check(cfg.data.image_size is None or (cfg.data.source == "hf" and cfg.data.image_size >= 1), "data.image_size",
           cfg.data.image_size, "null, or a size >= 1 with data.source=hf")
    _check(cfg.data.decode_threads >= 0, "data.decode_threads", cfg.data.decode_threads, ">= 0")
    for key in ("limit", "eval_limit"):
        v = getattr(cfg.data, key)
        _check(v is None or v >= 1, f"data.{key}", v, "null or >= 1")
    d = cfg.data
    _check(d.policy in POLICIES, "data.policy", d.policy, f"one of {POLICIES}")
    _check(d.score_table in SCORE_TABLES, "data.score_table", d.score_table, f"one of {SCORE_TABLES}")
    _check(0 <= d.tau <= 1, "data.tau", d.tau, "in [0, 1]")
    _check(0 <= d.gamma <= 1, "data.gamma", d.gamma, "in [0, 1]")
    _check(0 <= d.prune_ratio < 1, "data.prune_ratio", d.prune_ratio, "in [0, 1)")
    _check(0 <= d.anneal <= 1, "data.anneal", d.anneal, "in [0, 1]")
    _check(d.price >= 0, "data.price", d.price, ">= 0")
    _check(d.price_proxy in PRICE_PROXIES, "data.price_proxy", d.price_proxy, f"one of {PRICE_PROXIES}")
    _check(d.revision_epochs >= 0, "data.revision_epochs", d.revision_epochs, ">= 0")
    _check(not d.screen or d.policy in SCREENING_POLICIES, "data.screen", d.screen,
           f"false unless data.policy is one of {SCREENING_POLICIES} (a per-sample rule)")
    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "null or >= 1")
    _check(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size,
           "null or >= 1")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, ">= 1")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    _check(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    for key in ("eval_every", "checkpoint_every", "warmup_steps"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), ">= 0")
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0")
    _check(t.collective_timeout_s is None or t.collective_timeout_s > 0, "train.collective_timeout_s",
           t.collective_timeout_s, "null or > 0")
    _check(t.lr_schedule in SCHEDULES, "train.lr_schedule", t.lr_schedule, f"one of {SCHEDULES}")
    o = cfg.optimizer
    _check(o.name in OPTIMIZERS, "optimizer.name", o.name, f"one of {OPTIMIZERS}")
    _check(o.lr > 0, "optimizer.lr", o.lr, "> 0")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas),
           "two values in [0, 1)")
    _check(o.eps > 0, "optimizer.eps", o.eps, "> 0")
    _check(0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "in [0, 1)")
    _check(o.select in SELECT_RULES, "optimizer.select", o.select, f"one of {SELECT_RULES}")
    _check(0 < o.fraction <= 1, "optimizer.fraction", o.fraction, "in (0, 1]")
    _check(o.price >= 0, "optimizer.price", o.price, ">= 0")
    _check(o.count_price >= 0, "optimizer.count_price", o.count_price, ">= 0")
    _check(o.count_price == 0 or o.select == "soft", "optimizer.count_price", o.count_price,
           "0 unless optimizer.select is soft (hard's price is already per change)")
    _check(o.block_size >= 1, "optimizer.block_size", o.block_size, ">= 1")
    _check(0 <= o.dense_tail < 1, "optimizer.dense_tail", o.dense_tail, "in [0, 1)")
    for key in ("dense_1d", "dense_tail"):  # both only change what a masked optimizer selects
        value = getattr(o, key)
        _check(not value or o.name.startswith("masked"), f"optimizer.{key}", value,
               "unset unless optimizer.name is masked_adamw or masked_sgd")
    _check(0 <= o.residual_decay <= 1, "optimizer.residual_decay", o.residual_decay, "in [0, 1]")
    _check(o.residual or o.residual_decay == 1, "optimizer.residual_decay", o.residual_decay,
           "1 unless optimizer.residual is true (there is no residual to decay)")
    _check(not o.name.startswith(("adamw", "sgd")) or o.select == "dense", "optimizer.select", o.select,
           "dense for the plain torch optimizers (use masked_adamw or masked_sgd to select weights)")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", cfg.deepspeed.zero_stage,
           "one of 0, 1, 2, 3")
    e = cfg.energy
    _check(0 <= e.alpha <= 1, "energy.alpha", e.alpha, "in [0, 1]")
    _check(e.price >= 0, "energy.price", e.price, ">= 0")
    _check(e.budget is None or e.budget > 0, "energy.budget", e.budget, "null or > 0")
    _check(e.budget_per in ("run", "epoch"), "energy.budget_per", e.budget_per, "run or epoch")
    _check(e.price_step > 0, "energy.price_step", e.price_step, "> 0")
    _check(e.reprice_empty >= 0, "energy.reprice_empty", e.reprice_empty, ">= 0")
    _check(e.data_scale > 0, "energy.data_scale", e.data_scale, "> 0")
    _check(e.data_units in ("absolute", "relative"), "energy.data_units", e.data_units, "absolute or relative")
    _check(e.data_units == "absolute" or cfg.optimizer.name == "masked_adamw", "energy.data_units", e.data_units,
           "absolute unless optimizer.name is masked_adamw (relative units read AdamW's first moment)")
    _check(e.budget is None or e.controller, "energy.controller", e.controller, "true when energy.budget is set")
    priced = cfg.data.policy == "price" or (o.name.startswith("masked") and o.select in ("hard", "soft"))
    _check(not e.controller or priced, "energy.controller", e.controller,
           "false unless data.policy=price or optimizer.select=hard/soft (with a masked optimizer) is priced")


def _omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if key:
        return ConfigError(f"config key '{key}': {msg}")
    return ConfigError(msg)


MOVED_KEYS = {"data.text.cache_dir": "data.cache_dir"}
"""Keys that moved: {old: new}. Old config files (every run's config.yaml holds every key) still load."""


def _moved_in_file(file_cfg: DictConfig, path: Path) -> DictConfig:
    """`file_cfg` with each moved key under its new name (unresolved: interpolations keep working)."""
    raw = OmegaConf.to_container(file_cfg, resolve=False)
    for old, new in MOVED_KEYS.items():
        *parents, leaf = old.split(".")
        node = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if value is None:  # what every run's config.yaml held: nothing to move
            continue
        *new_parents, new_leaf = new.split(".")
        target = raw
        for p in new_parents:
            target = target.setdefault(p, {})
        if target.get(new_leaf) is None:
            target[new_leaf] = value
            print(f"[metabolic] {path}: config key '{old}' is now '{new}'", file=sys.stderr)
        else:
            print(f"[metabolic] {path}: config key '{old}' is now '{new}', which the file also sets; "
                  f"'{old}' is ignored", file=sys.stderr)
    return OmegaConf.create(raw)


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> ExperimentConfig:
    """Merge schema defaults <- YAML file <- dotlist overrides, then validate.

    Raises ConfigError (naming the key) for unknown keys, wrong types and bad values.
    """
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        merged = schema
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            try:
                file_cfg = OmegaConf.load(path)
            except Exception as err:  # yaml errors come in many types
                raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}")
            if not isinstance(file_cfg, DictConfig):
                raise ConfigError(f"config file '{path}' must hold a mapping of keys")
            merged = OmegaConf.merge(merged, _moved_in_file(file_cfg, path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key=value")
            key = item.split("=", 1)[0]
            if key in MOVED_KEYS:
                print(f"[metabolic] config key '{key}' is now '{MOVED_KEYS[key]}'", file=sys.stderr)
                key, item = MOVED_KEYS[key], f"{MOVED_KEYS[key]}={item.split('=', 1)[1]}"
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except OmegaConfBaseException as err:
                raise ConfigError(f"config key '{key}': {str(err).splitlines()[0]}")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err)
    validate(cfg)
    return cfg


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what config.yaml in a run holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as a plain dict."""
    return dataclasses.asdict(cfg)


def field_docs() -> dict[tuple[str, str], str]:
    """{(dataclass name, field name): the field's one-line docstring}, read from this module's source."""
    import ast
    import inspect

    docs = {}
    for node in ast.parse(inspect.getsource(sys.modules[__name__])).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, nxt in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[(node.name, stmt.target.id)] = " ".join(nxt.value.value.split())
    return docs


def explain(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML with every key's docstring as a comment (`metabolic config`)."""
    import yaml

    docs = field_docs()
    lines: list[str] = []

    def walk(node: Any, indent: str) -> None:
        for f in dataclasses.fields(node):
            value, doc = getattr(node, f.name), docs.get((type(node).__name__, f.name), "")
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:  # {doc}")
                walk(value, indent + "  ")
                continue
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            lines.append(f"{indent}{f.name}: {text}  # {doc}")

    walk(cfg, "")
    return "\n".join(lines) + "\n"
