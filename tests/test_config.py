"""Config errors: one line naming the key, exit code 2, nothing written."""

import pytest

from helpers import CONFIG, metabolic
from metabolic.engine.config import ConfigError, load_config


@pytest.mark.parametrize("override, key", [
    ("train.epochz=3", "train.epochz"),
    ("train.epochs=three", "train.epochs"),
    ("energy.alpha=1.5", "energy.alpha"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("optimizer.name=adam", "optimizer.name"),
    ("data.limit=0", "data.limit"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("nonsense=1", "nonsense"),
    ("optimizer.residual_decay=0.9", "optimizer.residual_decay"),  # no residual to decay
    ("optimizer.count_price=1e-6", "optimizer.count_price"),  # only with select=soft
    ("optimizer.dense_1d=true", "optimizer.dense_1d"),  # only with a masked optimizer
    ("optimizer.dense_tail=0.1", "optimizer.dense_tail"),  # only with a masked optimizer
    ("optimizer.lr=inf", "optimizer.lr"),  # every float must be finite
    ("optimizer.betas=[0.9,nan]", "optimizer.betas"),
    ("energy.budget=inf", "energy.budget"),
    ("data.screen=true", "data.screen"),  # the default policy (full) has no per-sample rule
    ("data.score_table=owner", "data.score_table"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s"),
    ("data.decode_threads=-1", "data.decode_threads"),
    ("train.eval_batch_size=-4", "train.eval_batch_size"),
    ("model.heads=3", "model.heads"),  # the default model has no heads, but vit does: see below
])
def test_bad_override_names_key(override, key):
    extra = ["model.name=vit"] if key == "model.heads" else []
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, extra + [override])
    assert f"'{key}'" in str(err.value)


@pytest.mark.parametrize("model", ["mlp", "resnet_small"])
def test_heads_are_not_checked_for_models_without_attention(model):
    assert load_config(CONFIG, [f"model.name={model}", "model.width=50"]).model.width == 50


def test_defaults_load():
    cfg = load_config(CONFIG, ["train.max_steps=50", "data.limit=null"])
    assert cfg.train.max_steps == 50 and cfg.data.limit is None
    assert cfg.model.name == "resnet_small" and cfg.optimizer.name == "adamw"


def test_cli_rejects_before_writing(tmp_path):
    out = tmp_path / "run"
    proc = metabolic("train", str(CONFIG), f"output_dir={out}", "energy.alpha=-0.5", timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "energy.alpha" in lines[0], proc.stderr
    assert not out.exists()


def test_cli_missing_config_file(tmp_path):
    proc = metabolic("train", str(tmp_path / "nope.yaml"), timeout=120)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr


def test_cli_bad_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 2\n")
    proc = metabolic("train", str(bad), f"output_dir={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 2 and "train.epocs" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("base, key, bad, bound, good", [
    (["optimizer.residual=true"], "residual_decay", 1.5, "in [0, 1]", 0.9),
    (["optimizer.name=masked_adamw"], "dense_tail", 1.0, "in [0, 1)", 0.2),
])
def test_range_error_names_key(base, key, bad, bound, good):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, base + [f"optimizer.{key}={bad}"])
    assert f"'optimizer.{key}'" in str(err.value) and bound in str(err.value)
    cfg = load_config(CONFIG, base + [f"optimizer.{key}={good}"])
    assert getattr(cfg.optimizer, key) == good


def _fields(cls, prefix=""):
    """Every (dataclass name, field name, dotted key) below cls."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield cls.__name__, f.name, prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")


def test_every_config_key_has_a_docstring():
    from metabolic.engine.config import ExperimentConfig, field_docs

    docs = field_docs()
    missing = [key for cls, name, key in _fields(ExperimentConfig) if not docs.get((cls, name))]
    assert not missing, f"config keys without a docstring: {missing}"


def test_cli_config_prints_the_resolved_config_with_each_keys_meaning():
    import yaml

    from metabolic.engine.config import ExperimentConfig, to_dict

    proc = metabolic("config", str(CONFIG), "optimizer.lr=1e-3", "data.policy=infobatch", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == to_dict(load_config(CONFIG, ["optimizer.lr=1e-3", "data.policy=infobatch"]))
    assert "  lr: 0.001  # Peak learning rate." in proc.stdout.splitlines()
    # one line per key, each with its comment
    keys = [key for _, _, key in _fields(ExperimentConfig)]
    assert len(proc.stdout.splitlines()) == len(keys) and all("  # " in l for l in proc.stdout.splitlines())
    # overrides alone apply to the defaults; a bad value is the same error as for train
    only = metabolic("config", "train.epochs=3", timeout=120)
    assert only.returncode == 0 and yaml.safe_load(only.stdout)["train"]["epochs"] == 3
    bad = metabolic("config", str(CONFIG), "optimizer.lr=-1", timeout=120)
    assert bad.returncode == 2 and "optimizer.lr" in bad.stderr and bad.stdout == ""


@pytest.mark.parametrize("path", sorted((CONFIG.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path, [])
    assert cfg.train.epochs >= 1 and cfg.output_dir


def test_a_moved_key_still_loads_from_old_config_files_and_overrides(tmp_path, capsys):
    # Every run's config.yaml holds every key, so a run written before data.text.cache_dir moved
    # to data.cache_dir must still load (its null is dropped; a value moves, with a notice).
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  text:\n    cache_dir: null\n    seq_len: 64\n")
    assert load_config(old).data.cache_dir is None and load_config(old).data.text.seq_len == 64
    old.write_text("data:\n  text:\n    cache_dir: /shared/prepared\n")
    assert load_config(old).data.cache_dir == "/shared/prepared"
    assert load_config(None, ["data.text.cache_dir=/x"]).data.cache_dir == "/x"
    assert "config key 'data.text.cache_dir' is now 'data.cache_dir'" in capsys.readouterr().err
    old.write_text("output_dir: /runs/a\ndata:\n  text:\n    cache_dir: ${output_dir}/prepared\n")
    assert load_config(old).data.cache_dir == "/runs/a/prepared"  # interpolations move unresolved
    old.write_text("data:\n  cache_dir: /new\n  text:\n    cache_dir: /old\n")
    assert load_config(old).data.cache_dir == "/new" and "'data.text.cache_dir' is ignored" in capsys.readouterr().err
