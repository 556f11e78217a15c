"""The command line's help, the resolved-config printout, and settings that are allowed with a note."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from dist_train.cli import TRAIN_EPILOG, main
from dist_train.config import all_keys, describe_config, field_docs
from dist_train.preflight import load_config
from dist_train.metrics import read_jsonl
from tests.conftest import DEBUG, ROOT


def test_a_smoke_run_shorter_than_the_configs_warmup_trains_with_a_note_and_the_lr_ramps(tmp_path, capsys,
                                                                                         no_wandb_env):
    """configs/debug.yaml warms up over 20 steps; train.max_steps=10 is the natural smoke test."""
    warmup = yaml.safe_load(DEBUG.read_text())["optim"]["warmup_steps"]
    peak = yaml.safe_load(DEBUG.read_text())["optim"]["lr"]
    assert warmup > 10
    assert main(["train", "--config", str(DEBUG), "train.max_steps=10", f"run.out_dir={tmp_path}",
                 "logging.every=1", "logging.wandb.mode=disabled", "logging.progress=plain"]) == 0
    err = capsys.readouterr().err
    note = f"dist-train: note: optim.warmup_steps={warmup} is more than train.max_steps=10: the learning rate ramps"
    assert note in err, err
    assert f"ends at 10/{warmup} of optim.lr={peak:g}" in err, err
    lrs = [r["optim/lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert lrs == pytest.approx([peak * s / warmup for s in range(1, 11)], rel=1e-6)
    assert max(lrs) < peak  # never the peak


def test_no_warmup_note_when_the_warmup_fits(tmp_path, capsys):
    assert main(["train", "--config", str(DEBUG), "--check", "train.max_steps=20", f"run.out_dir={tmp_path / 'r'}"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_both_problems_of_a_smoke_run_are_reported_at_once(tmp_path, capsys):
    """The warm-up note and the refusal of a run directory that holds a run, in one go."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "--config", str(DEBUG), "train.max_steps=10", f"run.out_dir={tmp_path}",
                 "logging.wandb.mode=disabled"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dist-train: note: optim.warmup_steps=") and err[1].startswith("dist-train: error:"), err


def test_train_help_names_every_config_key():
    """The --help epilog is written by hand; a key added to the schema must be added there too."""
    listed: dict[str, list[str]] = {}
    section = None
    for line in TRAIN_EPILOG.split("examples:")[0].splitlines()[1:]:
        if not line.strip():
            continue
        m = re.match(r"\s*(\w+\.)?\s+(.*)", line)
        section = m.group(1) or section  # a continuation line keeps the section
        for name in m.group(2).split():
            listed.setdefault(section, []).append(name)
    for key in all_keys():
        section, _, rest = key.partition(".")
        names = listed.get(section + ".", [])
        assert any(rest == n or (n.endswith("*") and rest.startswith(n[:-1])) for n in names), key


def test_print_config_is_the_resolved_config_with_each_keys_meaning(capsys):
    assert main(["train", "--config", str(DEBUG), "--print-config", "optim.lr=7e-4", "train.precision=no"]) == 0
    out = capsys.readouterr().out
    parsed = yaml.safe_load(out)
    cfg = load_config(str(DEBUG), ["optim.lr=7e-4", "train.precision=no"])
    assert parsed["optim"]["lr"] == 7e-4 and parsed["train"]["max_steps"] == cfg.train.max_steps
    assert parsed["logging"]["wandb"]["mode"] == cfg.logging.wandb.mode.value
    flat = {f"{s}.{k}" for s, v in parsed.items() for k in v}
    assert {k for k in all_keys() if k.count(".") == 1} <= flat
    # Each documented key's meaning stands above it.
    docs = field_docs()
    assert docs["train.max_steps"] == "Number of optimizer steps (unset, and no train.epochs: 300)."
    assert "# Number of optimizer steps (unset, and no train.epochs: 300).\n  max_steps:" in out
    assert out == describe_config(cfg)
    assert sum(bool(v) for v in docs.values()) >= 0.8 * len(docs)


def test_precision_is_named_fp32_everywhere(capsys, tmp_path):
    cfg = load_config(str(DEBUG), ["train.precision=fp32"])
    assert cfg.train.precision.label == "fp32"
    assert main(["train", "--config", str(DEBUG), "train.precision=fp8"]) == 2
    assert "expected one of auto, fp32 (or no), bf16, fp16" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["--max_steps", "10"], "e.g. train.max_steps=10"),
    (["--max-steps=10"], "e.g. train.max_steps=10"),
    (["--train.max_steps", "10"], "e.g. train.max_steps=10"),
    (["lr=1e-3"], "did you mean optim.lr=1e-3?"),
    (["warmup_steps=5"], "optim.warmup_steps=5 or clip.warmup_steps=5"),
])
def test_flags_and_bare_keys_are_steered_to_the_override(argv, hint, capsys):
    assert main(["train", "--config", str(DEBUG), *argv]) == 2
    err = capsys.readouterr().err
    assert hint in err and len(err.splitlines()) == 1, err


def test_an_unknown_flag_that_is_no_key_keeps_argparses_message(capsys):
    assert main(["train", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def _fake_torch(root, cuda) -> dict:
    """A `torch` package that refuses to be imported, with a version file of a build with or without CUDA; the
    environment that puts it first (then this checkout, for dist_train)."""
    (root / "torch").mkdir(parents=True)
    (root / "torch/__init__.py").write_text("raise ImportError('the GPU probe imported torch')\n")
    (root / "torch/version.py").write_text(f"from typing import Optional\n__version__ = '2.13.0'\n"
                                           f"cuda: Optional[str] = {cuda!r}\nhip: Optional[str] = None\n")
    return dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{ROOT}")


def test_the_launch_scripts_gpu_probe_reads_a_cpu_build_of_torch_without_importing_it(tmp_path):
    """`python -m dist_train.launchers gpus` (launch/accelerate.sh, launch/deepspeed.sh): a torch built without
    CUDA has no GPU, which its version file says in milliseconds; importing torch to ask takes seconds.
    Negative control: a CUDA build is asked through torch itself (here the fake torch refuses the import)."""
    probe = [sys.executable, "-m", "dist_train.launchers", "gpus"]
    p = subprocess.run(probe, env=_fake_torch(tmp_path / "cpu", None), capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "0\n"), p.stderr
    p = subprocess.run(probe, env=_fake_torch(tmp_path / "cuda", "12.8"), capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "the GPU probe imported torch" in p.stderr, p.stderr


def test_the_gpu_probe_is_torchs_device_count():
    import torch

    from dist_train.launchers import gpu_count

    assert gpu_count() == torch.cuda.device_count()


@pytest.mark.parametrize("script", ["accelerate", "deepspeed"])
def test_a_launch_script_whose_python_cannot_import_torch_says_so_in_one_line(tmp_path, script):
    """The GPU probe's failure is the script's one line and exit 2, nothing started (here a torch with no
    version file, so the probe imports it, and the import fails)."""
    env = _fake_torch(tmp_path, None)
    (tmp_path / "torch/version.py").unlink()
    for key in ("PYTHON", "NUM_PROCESSES", "HOSTFILE"):
        env.pop(key, None)
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"  # `python`: this environment's
    if script == "accelerate":
        env["NUM_PROCESSES"] = "1"  # deepspeed.sh asks the probe how many processes when NUM_PROCESSES is unset
    p = subprocess.run(["bash", f"launch/{script}.sh", f"run.out_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.splitlines() == [f"launch/{script}.sh: PYTHON=python cannot import torch or dist_train (try: python "
                                     "-c 'import torch'); install dist_train for it"], p.stderr
    assert not (tmp_path / "run").exists()
