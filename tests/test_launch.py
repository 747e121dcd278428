"""`metabolic launch` and `metabolic submit` without a cluster: argv building, dry runs, script
rendering, quoting of hostile config values, and one real accelerate launch (2 ranks, ZeRO-3)."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import CONFIG, REPO, SMALL, metabolic, ok, summary

# A config value that would do damage if it were ever parsed as shell text.
HOSTILE = """it's "quoted" $(touch PWNED); echo `id` ; rm -rf nothing && x='y'"""
HOSTILE_OVERRIDE = f"data.text.text_key={HOSTILE}"


def _launch_argv(*args: str) -> list[str]:
    proc = ok(metabolic("launch", str(CONFIG), *args, "--dry-run", timeout=120))
    return shlex.split(proc.stdout.strip().splitlines()[-1])


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_launch_dry_run_single_node(tmp_path):
    out = tmp_path / "run"
    argv = _launch_argv(f"output_dir={out}", "train.epochs=1", "--procs-per-node", "2")
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--cpu" not in argv  # `--cpu --num_processes 2` would start ONE process (PLATFORM.md)
    assert "--use_deepspeed" in argv and _flag(argv, "--deepspeed_config_file") == str(out / "deepspeed.json")
    assert _flag(argv, "--num_processes") == "2" and _flag(argv, "--num_machines") == "1"
    assert "--rdzv_backend" not in argv
    i = argv.index("--module")
    assert argv[i + 1:] == ["metabolic", "train", str(CONFIG), f"output_dir={out}", "train.epochs=1"]
    assert not out.exists(), "a dry run writes nothing"


def test_launch_dry_run_multi_node_uses_c10d(tmp_path):
    common = [f"output_dir={tmp_path / 'run'}", "--nodes", "3", "--procs-per-node", "4",
              "--main-address", "10.1.2.3", "--main-port", "29123"]
    head = _launch_argv(*common, "--node-rank", "0")
    other = _launch_argv(*common, "--node-rank", "2")
    for argv in (head, other):
        assert _flag(argv, "--num_processes") == "12" and _flag(argv, "--num_machines") == "3"
        assert _flag(argv, "--rdzv_backend") == "c10d" and _flag(argv, "--main_process_ip") == "10.1.2.3"
        assert _flag(argv, "--main_process_port") == "29123"
        assert _flag(argv, "--deepspeed_multinode_launcher") == "standard"
    assert _flag(head, "--machine_rank") == "0" and _flag(head, "--rdzv_conf") == "is_host=1"
    assert _flag(other, "--machine_rank") == "2" and _flag(other, "--rdzv_conf") == "is_host=0"


def test_launch_dry_run_keeps_hostile_value_one_word(tmp_path):
    argv = _launch_argv(f"output_dir={tmp_path / 'run'}", HOSTILE_OVERRIDE)
    assert argv[-1] == HOSTILE_OVERRIDE


def test_launch_errors_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "run"
    proc = metabolic("launch", str(CONFIG), f"output_dir={out}", "--nodes", "2", timeout=120)
    assert proc.returncode == 2 and "--main-address" in proc.stderr
    proc = metabolic("launch", str(CONFIG), f"output_dir={out}", "train.nonsense=1", timeout=120)
    assert proc.returncode == 2 and "train.nonsense" in proc.stderr
    proc = metabolic("launch", str(CONFIG), f"output_dir={out}", "--accelerate-config",
                     str(REPO / "configs/accelerate/deepspeed_zero3.yaml"), timeout=120)
    assert proc.returncode == 2 and "deepspeed.zero_stage=3" in proc.stderr
    for flag in ("--nodes", "--procs-per-node"):  # 0 is a value to refuse, not "use the default"
        proc = metabolic("launch", str(CONFIG), f"output_dir={out}", flag, "0", "--dry-run", timeout=120)
        assert proc.returncode == 2 and ">= 1" in proc.stderr, proc.stderr
    assert not out.exists()


def test_accelerate_config_files_supply_defaults(tmp_path):
    cfgs = REPO / "configs" / "accelerate"
    for name in ("single_node", "multi_node", "deepspeed_zero3"):
        data = yaml.safe_load((cfgs / f"{name}.yaml").read_text())
        assert data["distributed_type"] == "DEEPSPEED", name
    argv = _launch_argv(f"output_dir={tmp_path / 'a'}", "--accelerate-config", str(cfgs / "multi_node.yaml"),
                        "--node-rank", "1")
    assert _flag(argv, "--config_file").endswith("multi_node.yaml")
    assert _flag(argv, "--num_processes") == "4" and _flag(argv, "--num_machines") == "2"
    assert _flag(argv, "--machine_rank") == "1" and _flag(argv, "--rdzv_backend") == "c10d"
    argv = _launch_argv(f"output_dir={tmp_path / 'b'}", "deepspeed.zero_stage=3", "--accelerate-config",
                        str(cfgs / "deepspeed_zero3.yaml"))
    assert _flag(argv, "--num_processes") == "2"


def test_launch_runs_two_ranks_zero3_and_value_arrives_verbatim(tmp_path, fmnist):
    """A real `accelerate launch` through `metabolic launch`: 2 gloo ranks, ZeRO-3 from the accelerate config."""
    out = tmp_path / "run"
    proc = ok(metabolic("launch", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=1", "deepspeed.zero_stage=3",
                        HOSTILE_OVERRIDE, "--accelerate-config", str(REPO / "configs/accelerate/deepspeed_zero3.yaml"),
                        timeout=400))
    assert "accelerate.commands.launch" in proc.stderr
    s = summary(out)
    assert s["dist/world_size"] == 2 and s["data/samples_backward"] == 384
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["text"]["text_key"] == HOSTILE
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 2 * 32
    assert not list(REPO.glob("PWNED")) and not list(tmp_path.rglob("PWNED"))


# -- submit, rendered only (no cluster needed) -------------------------------------------------------

def _render(tmp_path, *args: str) -> str:
    proc = ok(metabolic("submit", str(CONFIG), f"output_dir={tmp_path / 'run'}", *args, "--dry-run", timeout=120))
    return proc.stdout


def _script_words(script: str, tmp_path: Path, var: str) -> list[str]:
    """What bash makes of the rendered array assignment `var=(...)`: the words a job passes on."""
    line = next(ln for ln in script.splitlines() if ln.startswith(f"{var}=("))
    probe = tmp_path / "probe.sh"
    probe.write_text(f"{line}\nprintf '%s\\0' \"${{{var}[@]}}\"\n")
    out = subprocess.run(["bash", str(probe)], capture_output=True, cwd=tmp_path, timeout=30, check=True).stdout
    return out.decode().split("\0")[:-1]


@pytest.mark.parametrize("nodes,gpus", [(1, 0), (2, 0), (1, 4), (3, 8)])
def test_submit_dry_run_renders_every_template(tmp_path, nodes, gpus):
    text = _render(tmp_path, "train.epochs=1", "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                   "--partition", "gpu_q", "--time", "01:00:00", "--signal-seconds", "90")
    script = text.split("\n", 1)[1].rsplit("# submit with:", 1)[0]
    run = tmp_path / "run"
    assert f"#SBATCH --nodes={nodes}" in script and "#SBATCH --ntasks-per-node=1" in script
    assert ("#SBATCH --gpus-per-node=" in script) == (gpus > 0)
    assert f"PROCS_PER_NODE={max(gpus, 1)}" in script
    for line in ("#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "#SBATCH --partition=gpu_q",
                 "#SBATCH --time=01:00:00", f"#SBATCH --output={run}/slurm/%j.out"):
        assert line in script
    assert "{{" not in script
    (tmp_path / "job.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], check=True, timeout=30)
    # The job gets absolute paths and resume=true last (a requeued job resumes; a first run starts fresh).
    assert _script_words(script, tmp_path, "EXPERIMENT") == [str(CONFIG), f"output_dir={run}", "train.epochs=1",
                                                            f"output_dir={run}", "resume=true"]
    assert not run.exists(), "a dry run writes nothing"


def test_submit_quotes_hostile_values(tmp_path):
    script = _render(tmp_path, HOSTILE_OVERRIDE, "--nodes", "2")
    words = _script_words(script, tmp_path, "EXPERIMENT")
    assert words[2] == HOSTILE_OVERRIDE
    assert not list(tmp_path.rglob("PWNED"))


def test_submit_refusals_exit_2(tmp_path):
    run = tmp_path / "run"
    for bad in (["--time", "1h; rm -rf /"], ["--partition", "a\n#SBATCH --x"], ["--nodes", "0"]):
        proc = metabolic("submit", str(CONFIG), f"output_dir={run}", *bad, "--dry-run", timeout=120)
        assert proc.returncode == 2, bad
    proc = metabolic("submit", str(CONFIG), f"output_dir={run}", "train.bogus=1", "--dry-run", timeout=120)
    assert proc.returncode == 2 and "train.bogus" in proc.stderr
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    proc = metabolic("submit", str(CONFIG), f"output_dir={run}", "--dry-run", timeout=120)
    assert proc.returncode == 2 and "resume=true" in proc.stderr
    ok(metabolic("submit", str(CONFIG), f"output_dir={run}", "resume=true", "--dry-run", timeout=120))
