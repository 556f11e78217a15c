"""Bad input, table-driven, through the real CLI (and launch/torchrun.sh), each case its own process.

Every case runs in its own fresh working directory and must end with its exit
code (2 bad input, 1 found only while training), exactly one line on stderr
naming what is wrong, no traceback, and nothing written: the directory holds
exactly the fixture files the case created itself.

All processes run once, concurrently, in a module-scoped fixture; the
parametrized tests then only assert. A case's process is forked by the warm test
server (tests/forkserver.py: its own pid, cwd, environment, stdio and exit code,
without paying for `import torch` again); the cases in FRESH are fresh
interpreters, for what only a cold start shows.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests import forkserver
from tests.conftest import ROOT, SHIMS

CONFIG = str(ROOT / "configs/debug.yaml")
LAUNCH = str(ROOT / "launch/torchrun.sh")
DS_LAUNCH = str(ROOT / "launch/deepspeed.sh")
SMALL = ["train.max_steps=3", "optim.warmup_steps=0"]
TRAIN = ["train", "--config", CONFIG, "run.out_dir=out", "logging.wandb.mode=disabled", *SMALL]
ERROR = "dist-train: error:"
LAUNCH_ERROR = "launch/torchrun.sh:"
#: Launcher variables stripped from every case's environment (a case sets what it needs).
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK", "NODE_RANK", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU",
                 "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION",
                 "FSDP_OFFLOAD_PARAMS", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
#: Settings of launch/torchrun.sh stripped from every case's environment.
LAUNCH_VARS = ("CONFIG", "COMMAND", "NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_TIMEOUT",
               "MAX_RESTARTS", "PYTHON", "DS_CONFIG", "LAUNCHER", "NUM_PROCESSES", "HOSTFILE")
#: Cases run by a fresh interpreter (`python -m dist_train`), not forked warm: a cold start's exit code, one
#: line and no traceback, for an error found before torch is imported, in the model factory, and in training.
FRESH = ("config_missing", "factory_raises", "factory_fails_while_training", "text_file_not_utf8")
TIMEOUT = 60  # a case that hangs (a FIFO opened for reading) fails after this


@dataclass
class Case:
    name: str
    args: list[str]
    """Arguments of `python -m dist_train` (of launch/torchrun.sh with launch=True); '{d}' is the case dir."""
    fragment: str = ""
    """Must appear in the error line (unused by positive controls)."""
    code: int = 2
    files: dict[str, Optional[str | bytes]] = field(default_factory=dict)
    """Fixture files to create: text, bytes, a directory (None), or a FIFO ('<fifo>')."""
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    launch: bool = False
    forbid: tuple[str, ...] = ()
    """Fragments the error line must not hold."""
    traceback: bool = False
    """--debug: a traceback is expected; the last stderr line is the error line."""
    during_training: bool = False
    """Found only once the work runs (training; prepare reading its input): startup lines may come before the
    error line."""
    control: Optional[Callable[[Path, subprocess.CompletedProcess], None]] = None
    """A positive control: exit `code`, then this check instead of the one-line rule."""
    fragment_from_cli: bool = False
    """A launch case whose error comes from dist-train (the script's config check), not from the script."""
    script: str = LAUNCH
    """The launch script of a launch case."""

    @property
    def prefix(self) -> str:
        if self.launch and not self.fragment_from_cli:
            return f"launch/{Path(self.script).name}:"
        return ERROR


FIFO = "<fifo>"
DIR = None


def factory(body: str) -> dict[str, str]:
    """A module `my_factory.py` in the case directory: torch imports plus `body`."""
    return {"my_factory.py": "import torch\nimport torch.nn as nn\n\n" + body}


def model_module(forward: str, extra: str = "") -> dict[str, str]:
    """A factory `build` whose model's forward(idx) runs `forward` (vocab size in self.v)."""
    return factory(
        "class M(nn.Module):\n"
        "    def __init__(self, cfg, vocab_size):\n"
        "        super().__init__()\n"
        "        self.v = vocab_size\n"
        "        self.emb = nn.Embedding(vocab_size, 8)\n"
        "        self.head = nn.Linear(8, vocab_size)\n"
        "    def forward(self, idx):\n"
        f"        {forward}\n"
        f"{extra}\n"
        "def build(cfg, vocab_size):\n"
        "    return M(cfg, vocab_size)\n"
    )


def with_factory(spec: str = "my_factory:build") -> list[str]:
    return [*TRAIN, f"model.factory={spec}"]


RECORD = '{"step": %d, "train/loss": 1.0, "grad_norm/raw": 2.0, "grad_norm/clipped": 1.0, ' \
         '"grad_norm/clip_coef": 0.5, "grad_norm/threshold": 1.0, "optim/step_skipped": 0}'
NULL_RECORD = '{"step": %d, "train/loss": 1.0, "grad_norm/raw": null, "grad_norm/clipped": null, ' \
              '"grad_norm/clip_coef": null, "grad_norm/threshold": null, "optim/step_skipped": 1}'
GOOD_LINES = "".join(RECORD % s + "\n" for s in (1, 2))


def launch(*overrides: str, **env: str) -> dict:
    """A launch/torchrun.sh case: absolute run.out_dir under the case dir, the given settings."""
    return dict(args=["run.out_dir={d}/out", "logging.wandb.mode=disabled", *SMALL, *overrides], env=env,
                launch=True)


def ds_launch(*overrides: str, **env: str) -> dict:
    """A launch/deepspeed.sh case."""
    return {**launch(*overrides, **env), "script": DS_LAUNCH}


def deepspeed(json_text: Optional[str], *overrides: str) -> dict:
    """A dist.strategy=deepspeed case with the DeepSpeed JSON `json_text` as ds.json (None: no JSON)."""
    args = [*TRAIN, "dist.strategy=deepspeed", *(["dist.deepspeed_config=ds.json"] if json_text else []), *overrides]
    return dict(args=args, files={"ds.json": json_text} if json_text else {})


def _onednn_fp16() -> bool:
    """Whether DeepSpeed's CPU accelerator runs fp16 on this machine (it asks oneDNN)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def sidecar_text(vocab_size: int, num_tokens: int | None, dtype: str = "uint16") -> str:
    return json.dumps({"dtype": dtype, "vocab_size": vocab_size, "num_tokens": num_tokens})


def tokens(stem: str, n: int, side: bool = True, bad_at: int = -1) -> dict[str, str | bytes]:
    """A token file `stem.bin` of n uint16 ids below 32 (id 40 at position bad_at), with its sidecar `stem.json`."""
    ids = [(7 * i) % 32 for i in range(n)]
    if bad_at >= 0:
        ids[bad_at] = 40
    files: dict[str, str | bytes] = {f"{stem}.bin": b"".join(i.to_bytes(2, "little") for i in ids)}
    if side:
        files[f"{stem}.json"] = sidecar_text(32, n)
    return files


# ---- positive controls --------------------------------------------------------------------------------
def _config_ok(d: Path, p: subprocess.CompletedProcess) -> None:
    assert "config OK" in p.stderr
    assert not (d / "out").exists()  # --check writes nothing


def _trained(d: Path, p: subprocess.CompletedProcess) -> None:
    lines = (d / "out" / "metrics.jsonl").read_text().splitlines()  # json, not read_jsonl: no torch import here
    assert lines and json.loads(lines[-1])["step"] == 3, p.stderr


def _prepared(d: Path, p: subprocess.CompletedProcess) -> None:
    side = json.loads((d / "t.json").read_text())
    ids = (d / "t.bin").read_bytes()
    text = "".join(side["vocab"][int.from_bytes(ids[i : i + 2], "little")] for i in range(0, len(ids), 2))
    assert side["dtype"] == "uint16" and text == "ab\nba", p.stderr
    assert p.stderr.splitlines()[0] == ("dist-train: prepare: 2 files under 'in' matching '*', in this order: "
                                        "a.txt, b.txt")
    assert sorted(x.name for x in d.iterdir()) == ["in", "t.bin", "t.json"]  # no temporary file left


def _plotted(warning: Optional[str]) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(d: Path, p: subprocess.CompletedProcess) -> None:
        png = d / "run" / "plot.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stdout.strip() == str(Path("run") / "plot.png")
        lines = p.stderr.splitlines()
        if warning is None:
            assert lines == [], p.stderr
        else:
            assert len(lines) == 1 and lines[0].startswith("dist-train: warning:") and warning in lines[0], p.stderr
        assert "Traceback" not in p.stdout + p.stderr

    return check


def pth(obj) -> bytes:
    """What torch.save writes for `obj` (a data.file fixture)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def classify_data(n: int = 8, classes: int = 4, bad_label_at: int = -1) -> bytes:
    """(features (n, 6) float32, labels (n,) int64 below `classes`, one label `classes + 3` at bad_label_at)."""
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    if bad_label_at >= 0:
        y[bad_label_at] = classes + 3
    return pth((torch.randn(n, 6, generator=g), y))


def pickled_dataset() -> bytes:
    """What the article's torch.load reads: a pickled TensorDataset object, not plain tensors."""
    import torch

    return pth(torch.utils.data.TensorDataset(torch.zeros(4, 6), torch.zeros(4, dtype=torch.long)))


def empty_data() -> bytes:
    import torch

    return pth((torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)))


#: A classifier of (B, 6) features; `classes` fixes its outputs, else it takes num_classes from the labels.
CLASSIFIER = ("class Net(nn.Module):\n    def __init__(self, num_classes):\n        super().__init__()\n"
              "        self.fc = nn.Linear(6, {classes})\n    def forward(self, x):\n        return self.fc(x)\n")
CLASSIFY = [*TRAIN, "model.factory=my_factory:Net", "data.file=d.pth", "train.global_batch_size=4",
            "data.shuffle=false", "logging.every=1"]


def classifier(classes: str = "num_classes", forward: str = "self.fc(x)") -> dict[str, str]:
    return factory(CLASSIFIER.format(classes=classes).replace("return self.fc(x)", f"return {forward}"))


#: A map-style Dataset factory `make` in my_data.py; `sample` is the body of __getitem__(i).
def dataset_module(sample: str, n: int = 8, returns: str = "D()") -> dict[str, str]:
    return {"my_data.py": "import torch\n\nclass D(torch.utils.data.Dataset):\n"
            f"    def __len__(self):\n        return {n}\n"
            f"    def __getitem__(self, i):\n        {sample}\n\n"
            f"def make(seed):\n    return {returns}\n"}


CASES = [
    # ---- tasks, data a user has, optimizers, epochs and evaluation ----------------------------------------
    Case("data_factory_returns_list", [*CLASSIFY[:-5], "model.factory=my_factory:Net", "data.factory=my_data:make"],
         "returned list (train), not a map-style torch.utils.data.Dataset",
         files={**dataset_module("return torch.zeros(6), 0", returns="[1, 2]"), **classifier()}),
    Case("samples_do_not_collate", [*CLASSIFY[:-5], "model.factory=my_factory:Net", "data.factory=my_data:make",
                                    "train.global_batch_size=4", "data.shuffle=false", "task.name=classify"],
         "sample 3 does not batch with sample 0: (tensor (7,) float32, int) against (tensor (6,) float32, int)",
         during_training=True,
         files={**dataset_module("return torch.zeros(7 if i == 3 else 6), i % 2"), **classifier()}),
    Case("label_out_of_range", CLASSIFY, "sample 2 of data.file 'd.pth' has label 7, not in [0, 4)",
         during_training=True, files={"d.pth": classify_data(bad_label_at=2), **classifier(classes="4")}),
    Case("classifier_logits_under_lm", [*with_factory(), "task.name=lm"], "a classifier's (B, C)",
         files=model_module("return self.head(self.emb(idx).mean(1))")),
    Case("lm_on_image_samples", [*CLASSIFY, "task.name=lm"],
         "task lm needs samples that are windows of token ids (an integer tensor of T + 1 ids each); data.file "
         "'d.pth' holds samples of (tensor (6,) float32, tensor () int64)",
         files={"d.pth": classify_data(), **classifier()}),
    Case("pickled_dataset_in_data_file", CLASSIFY, "holds a pickled Python object (a Dataset?), not tensors",
         files={"d.pth": pickled_dataset(), **classifier()}),
    Case("val_file_empty", [*CLASSIFY, "data.val_file=v.pth"], "'data.val_file': 'v.pth' holds no samples",
         files={"d.pth": classify_data(), "v.pth": empty_data(), **classifier()}),
    Case("val_fraction_too_small", [*CLASSIFY, "data.val_fraction=0.05"], "is 0, no validation sample",
         files={"d.pth": classify_data(), **classifier()}),
    Case("epochs_and_max_steps", [*TRAIN, "train.epochs=2"], "'train.epochs': train.max_steps=3 is set too"),
    Case("betas_under_sgd", [*TRAIN, "optim.name=sgd", "optim.beta1=0.8"],
         "'optim.beta1': is an option of adam and adamw, and optim.name is sgd"),
    Case("nesterov_without_momentum", [*TRAIN, "optim.name=sgd", "optim.nesterov=true"],
         "'optim.nesterov': Nesterov momentum needs momentum"),
    Case("momentum_under_adamw", [*TRAIN, "optim.momentum=0.9"], "'optim.momentum': is an option of sgd"),
    Case("optimizer_unknown", [*TRAIN, "optim.name=lion"], "optim.name"),
    Case("model_gets_no_gradient", with_factory(), "no parameter of the model received a gradient",
         during_training=True, files=model_module("return self.head(self.emb(idx)).detach()")),
    Case("eval_every_negative", [*TRAIN, "eval.every=-1"], "'eval.every': must be >= 0"),
    Case("task_unknown", [*TRAIN, "task.name=regress"], "task.name"),
    # ---- model.factory ------------------------------------------------------------------------
    Case("factory_raises", with_factory(), "raised RuntimeError: boom",
         files=factory("def build(cfg, vocab_size):\n    raise RuntimeError('boom')\n")),
    Case("factory_returns_int", with_factory(), "returned int, not a torch.nn.Module",
         files=factory("def build(cfg, vocab_size):\n    return 3\n")),
    Case("factory_returns_class", with_factory(), "returned the class M, not an instance",
         files=factory("class M(nn.Module):\n    pass\n\ndef build(cfg, vocab_size):\n    return M\n")),
    Case("factory_unknown_argument", with_factory(), "'build' requires the argument 'config' is not one it can be given",
         files=factory("def build(config, vocab_size):\n    return nn.Linear(2, 2)\n")),
    Case("factory_output_2d", with_factory(), "to shape (2, 32); expected (2, 32, V)",
         files=model_module("return self.head(self.emb(idx)).sum(-1)")),
    Case("factory_output_vocab_too_small", with_factory(), "to shape (2, 32, 16)",
         files=model_module("return self.head(self.emb(idx))[..., :16]")),
    Case("factory_output_tuple", with_factory(), "returned tuple for a (2, 32) batch",
         files=model_module("return self.head(self.emb(idx)), None")),
    Case("factory_syntax_error", with_factory(), "module 'my_factory' has a syntax error",
         files={"my_factory.py": "def build(cfg, vocab_size)\n    return None\n"}),
    Case("factory_import_raises", with_factory(), "importing module 'my_factory' raised ValueError: at import",
         files={"my_factory.py": "raise ValueError('at import')\n"}),
    Case("factory_module_missing", with_factory("no_such_module_xyz:build"),
         "cannot import module 'no_such_module_xyz'"),
    Case("factory_spec_without_colon", with_factory("my_factory.build"),
         "is not of the form 'package.module:function'"),
    Case("factory_attribute_missing", with_factory("my_factory:nope"), "module 'my_factory' has no callable 'nope'",
         files=factory("def build(cfg, vocab_size):\n    return None\n")),
    # Found only while training: the model fails in train mode, after the output check passed (eval mode).
    Case("factory_fails_while_training", with_factory(), "fails in training mode", code=1, during_training=True,
         files=model_module("if self.training:\n            raise RuntimeError('fails in training mode')\n"
                            "        return self.head(self.emb(idx))")),
    # ---- run.out_dir ----------------------------------------------------------------------------
    Case("out_dir_is_file", [*TRAIN, "run.out_dir=out"], "is an existing file, not a directory",
         files={"out": "x"}),
    Case("out_dir_under_file", [*TRAIN, "run.out_dir=f/sub/run"], "lies under 'f', which is a file",
         files={"f": "x"}),
    Case("out_dir_unwritable", [*TRAIN, "run.out_dir=/proc/dist_train_test"], "cannot be created"),
    Case("out_dir_name_too_long", [*TRAIN, "run.out_dir=" + "n" * 300], "name of 300 characters"),
    Case("out_dir_path_too_long", [*TRAIN, "run.out_dir=" + "/".join(["p" * 200] * 25)], "run.out_dir is too long"),
    # ---- W&B ------------------------------------------------------------------------------------------
    Case("wandb_online_without_key", [*TRAIN, "logging.wandb.mode=online"], "online needs a W&B API key",
         env={"HOME": "{d}"}, unset=("NETRC",)),
    # ---- numbers --------------------------------------------------------------------------------------
    Case("lr_inf", [*TRAIN, "optim.lr=inf"], "'optim.lr': must be finite"),
    Case("lr_nan", [*TRAIN, "optim.lr=nan"], "'optim.lr': must be finite"),
    Case("lr_negative", [*TRAIN, "optim.lr=-1"], "'optim.lr': must be finite and > 0"),
    Case("clip_eps_inf", [*TRAIN, "clip.eps=inf"], "'clip.eps'"),
    Case("clip_max_norm_inf", [*TRAIN, "clip.max_norm=inf"], "'clip.max_norm'"),
    # ---- adaptive clipping, spike skipping, forensics ---------------------------------------------------
    Case("clip_policy_unknown", [*TRAIN, "clip.policy=zclip"], "unknown policy 'zclip'; choose one of"),
    Case("clip_zscore_alpha_one", [*TRAIN, "clip.policy=zscore", "clip.zscore_alpha=1"],
         "'clip.zscore_alpha': must be in (0, 1)"),
    Case("clip_warmup_zero", [*TRAIN, "clip.policy=zscore", "clip.warmup_steps=0"], "'clip.warmup_steps': must be >= 1"),
    Case("clip_percentile_over_100", [*TRAIN, "clip.policy=percentile", "clip.percentile=150"],
         "'clip.percentile': must be in [0, 100]"),
    Case("clip_update_with_bad", [*TRAIN, "clip.zscore_update_with=mean"], "'clip.zscore_update_with'"),
    Case("clip_skip_sigma_negative", [*TRAIN, "clip.skip_sigma=-1"], "'clip.skip_sigma': must be finite and >= 0"),
    Case("clip_skip_min_steps_over_window", [*TRAIN, "clip.skip_sigma=6", "clip.skip_window=8",
                                             "clip.skip_min_steps=9"], "'clip.skip_min_steps': 9 is more than clip.skip_window=8"),
    Case("clip_skip_on_bad", [*TRAIN, "clip.skip_on=grad"], "'clip.skip_on': must be norm, loss or both"),
    Case("per_layer_every_negative", [*TRAIN, "logging.per_layer_every=-1"], "'logging.per_layer_every'"),
    Case("skip_steps_zero", [*TRAIN, "data.skip_steps=[0]"], "'data.skip_steps': steps are 1-based"),
    Case("skip_steps_not_ints", [*TRAIN, "data.skip_steps=[a]"], "data.skip_steps"),
    Case("skip_steps_file_missing", [*TRAIN, "data.skip_steps_file=nope.txt"], "'nope.txt' not found"),
    Case("skip_steps_file_garbage", [*TRAIN, "data.skip_steps_file=s.txt"], "line 2 of 's.txt' holds 'x7'",
         files={"s.txt": "3 4\nx7\n"}),
    Case("skip_steps_scalar", [*TRAIN, "data.skip_steps=5"], "must be a list of steps, e.g. data.skip_steps=["),
    Case("skip_steps_file_cut_off", [*TRAIN, "data.skip_steps_file=s.jsonl"], "line 2 of 's.jsonl' is not valid JSON",
         files={"s.jsonl": '{"step": 3, "batch": 3}\n{"batch": 4'}),
    Case("skip_steps_file_not_spikes", [*TRAIN, "data.skip_steps_file=s.jsonl"], "without a 'batch'",
         files={"s.jsonl": '{"step": 3}\n'}),
    Case("seed_float_1e23", [*TRAIN, "train.seed=1e23"], "'train.seed'"),
    Case("seed_int_1e23", [*TRAIN, "train.seed=100000000000000000000000"], "'train.seed'"),
    Case("num_samples_float_1e10", [*TRAIN, "data.num_samples=1e10"], "'data.num_samples'"),
    Case("num_samples_int_1e10", [*TRAIN, "data.num_samples=10000000000"], "'data.num_samples'"),
    Case("d_model_huge", [*TRAIN, "model.d_model=400000"], "'model.d_model'"),
    Case("timeout_inf", [*TRAIN, "dist.timeout_s=inf"], "'dist.timeout_s'"),
    Case("global_batch_zero", [*TRAIN, "train.global_batch_size=0"], "'train.global_batch_size': must be > 0"),
    Case("max_steps_not_a_number", [*TRAIN, "train.max_steps=ten"], "'train.max_steps'"),
    # ---- checkpoints and resume --------------------------------------------------------------------------
    Case("checkpoint_every_negative", [*TRAIN, "train.checkpoint_every=-1"], "'train.checkpoint_every': must be >= 0"),
    Case("keep_no_checkpoint", [*TRAIN, "train.keep_checkpoints=0"], "'train.keep_checkpoints': must be >= 1"),
    Case("resume_path_missing", [*TRAIN, "train.resume={d}/nope"], "is not a directory; pass a checkpoint folder"),
    Case("resume_and_overwrite", [*TRAIN, "train.resume=auto", "run.overwrite=true"], "pass only one of them"),
    Case("resume_without_checkpoints", [*TRAIN, "train.resume=auto", "train.checkpoint=false"],
         "resuming needs train.checkpoint=true"),
    Case("resume_from_a_folder_without_checkpoints", [*TRAIN, "train.resume={d}/empty"],
         "is neither a checkpoint (a step_N folder) nor a run directory holding checkpoints", files={"empty": None}),
    # ---- strategies ------------------------------------------------------------------------------------
    Case("strategy_unknown", [*TRAIN, "dist.strategy=zero3"], "'dist.strategy'"),
    Case("accelerate_accumulates_too", [*TRAIN], "dist_train accumulates itself",
         env={"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}),
    Case("fsdp_replica_guard", [*TRAIN, "dist.strategy=fsdp", "dist.check_sync_every=10"],
         "holds a shard, not a replica"),
    Case("accelerate_without_its_launcher", [*TRAIN, "dist.strategy=accelerate"],
         "needs a job started by accelerate launch"),
    Case("precision_contradicts_accelerate", [*TRAIN, "train.precision=fp16"],
         "fp16 contradicts Accelerate's mixed_precision 'bf16'", env={"ACCELERATE_MIXED_PRECISION": "bf16"}),
    # ---- launcher environment ------------------------------------------------------------------------
    Case("master_port_not_a_number", TRAIN, "MASTER_PORT='abc'",
         env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"}),
    Case("rank_not_a_number", TRAIN, "RANK='x' is not an integer",
         env={"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}),
    Case("world_size_missing", TRAIN, "WORLD_SIZE is not set", env={"RANK": "0"}),
    # ---- config files -------------------------------------------------------------------------------
    Case("config_is_a_list", ["train", "--config", "c.yaml", "run.out_dir=out"], "not a list",
         files={"c.yaml": "- train\n- optim\n"}),
    Case("config_invalid_yaml", ["train", "--config", "c.yaml", "run.out_dir=out"], "'c.yaml' is not valid YAML",
         files={"c.yaml": "train: {max_steps: 3\noptim: [\n"}),
    Case("config_is_a_directory", ["train", "--config", "c", "run.out_dir=out"], "'c' is a directory",
         files={"c": DIR}),
    Case("config_is_a_fifo", ["train", "--config", "c.yaml", "run.out_dir=out"], "'c.yaml' is not a regular file",
         files={"c.yaml": FIFO}),
    Case("config_missing", ["train", "--config", "missing.yaml", "run.out_dir=out"], "'missing.yaml' not found"),
    Case("config_not_utf8", ["train", "--config", "c.yaml", "run.out_dir=out"], "'c.yaml' is not UTF-8",
         files={"c.yaml": b"train:\n  max_steps: 3 # \xff\xfe caf\xe9\n"}),
    Case("unknown_key", ["train", "run.out_dir=out", "logging.wandb.mode=disabled", "train.max_stepz=3"],
         "did you mean 'train.max_steps'", forbid=("debug.yaml",)),
    Case("text_file_is_a_directory", [*TRAIN, "data.text_file=t"], "'t' is a directory", files={"t": DIR}),
    Case("text_file_is_a_fifo", [*TRAIN, "data.text_file=t.txt"], "'t.txt' is not a regular file",
         files={"t.txt": FIFO}),
    Case("text_file_missing", [*TRAIN, "data.text_file=missing.txt"], "'missing.txt' not found"),
    Case("text_file_not_utf8", [*TRAIN, "data.text_file=t.txt"], "'t.txt' is not UTF-8 text",
         files={"t.txt": b"hello world, " * 10 + b"\xff\xfe" + b"more text " * 10}),
    Case("text_file_too_short", [*TRAIN, "data.text_file=t.txt"], "fewer than model.block_size+1=33",
         files={"t.txt": "too short\n"}),
    # ---- data.token_file --------------------------------------------------------------------------------
    Case("token_and_text_file", [*TRAIN, "data.text_file=t.txt", "data.token_file=t.bin"],
         "'data.token_file': data.text_file is set too", files={"t.txt": "x" * 100, **tokens("t", 100)}),
    Case("token_file_missing", [*TRAIN, "data.token_file=nope.bin"], "'data.token_file': file 'nope.bin' not found"),
    Case("token_file_odd_size", [*TRAIN, "data.token_file=t.bin"],
         "'t.bin' is 2001 bytes, not a whole number of uint16 ids (2 bytes each)",
         files={"t.bin": bytes(2001), "t.json": sidecar_text(1000, num_tokens=None)}),
    Case("token_file_without_sidecar_or_dtype", [*TRAIN, "data.token_file=t.bin", "data.vocab_size=32"],
         "'data.token_dtype': data.token_file 't.bin' has no sidecar 't.json'", files=tokens("t", 100, side=False)),
    Case("vocab_size_contradicts_sidecar", [*TRAIN, "data.token_file=t.bin", "data.vocab_size=50"],
         "'data.vocab_size': 50 contradicts the sidecar 't.json' (vocab_size 32)", files=tokens("t", 100)),
    Case("token_id_beyond_vocabulary", [*TRAIN, "data.token_file=t.bin"],
         "token 3 (in sample 0) is id 40, not below the vocabulary size 32 (from its sidecar 't.json')",
         files=tokens("t", 2000, bad_at=3), during_training=True),
    # ---- prepare --------------------------------------------------------------------------------------
    Case("prepare_output_exists", ["prepare", "in.txt", "t.bin"], "'t.bin' exists; pass --overwrite",
         files={"in.txt": "some text\n", "t.bin": "old"}),
    # After the line that names the files it takes.
    Case("prepare_not_utf8", ["prepare", "in", "t.bin"], "input file 'in/b.txt' is not UTF-8 text",
         files={"in/a.txt": "fine\n", "in/b.txt": b"caf\xe9\n"}, during_training=True),
    # ---- arguments ------------------------------------------------------------------------------------
    Case("unknown_flag", ["train", "--bogus", "run.out_dir=out"], "unrecognized arguments: --bogus"),
    Case("verify_zero_steps", ["verify", "--config", CONFIG, "--steps", "0"], "--steps must be >= 1"),
    Case("verify_single_process", ["verify", "--config", CONFIG, "--steps", "1", "logging.wandb.mode=disabled"],
         "needs at least 2 ranks"),
    Case("debug_after_subcommand", ["train", "--debug", "--config", "missing.yaml", "run.out_dir=out"],
         "'missing.yaml' not found", traceback=True),
    # ---- plot -------------------------------------------------------------------------------------------
    Case("plot_non_object_line", ["plot", "run"], "line 2 is not a metrics record",
         files={"run/metrics.jsonl": RECORD % 1 + "\n[1,2]\n"}),
    Case("plot_line_without_step", ["plot", "run"], "line 2 is not a metrics record",
         files={"run/metrics.jsonl": RECORD % 1 + '\n{"train/loss": 1.0}\n'}),
    Case("plot_invalid_json_in_middle", ["plot", "run"], "line 2 is not valid JSON",
         files={"run/metrics.jsonl": RECORD % 1 + "\n{not json\n" + RECORD % 3 + "\n"}),
    Case("plot_out_in_missing_directory", ["plot", "run", "--out", "nowhere/p.png"], "'nowhere' does not exist",
         files={"run/metrics.jsonl": GOOD_LINES}),
    Case("plot_without_metrics", ["plot", "run"], "has no metrics.jsonl", files={"run": DIR}),
    # ---- launch/torchrun.sh -----------------------------------------------------------------------------
    Case("launch_nproc_abc", fragment="NPROC_PER_NODE must be a number >= 1", **launch(NPROC_PER_NODE="abc")),
    Case("launch_nproc_zero", fragment="NPROC_PER_NODE must be a number >= 1", **launch(NPROC_PER_NODE="0")),
    Case("launch_nnodes_abc", fragment="NNODES must be a whole number", **launch(NNODES="abc")),
    Case("launch_nnodes_zero", fragment="NNODES must be a whole number", **launch(NNODES="0")),
    Case("launch_rdzv_timeout_abc", fragment="RDZV_TIMEOUT must be a whole number",
         **launch(RDZV_TIMEOUT="abc", NPROC_PER_NODE="2")),
    Case("launch_max_restarts_negative", fragment="MAX_RESTARTS must be a whole number >= 0",
         **launch(MAX_RESTARTS="-1", NPROC_PER_NODE="2")),
    Case("launch_bad_override", fragment="unknown config key 'train.bogus'", fragment_from_cli=True,
         **launch("train.bogus=1", NPROC_PER_NODE="2")),
    # The preflight checks what it can before the launch: a missing checkpoint is one line, not a rank's
    # error and torchrun's failure table.
    Case("launch_resume_missing", fragment="train.resume: the checkpoint", fragment_from_cli=True,
         **launch("train.resume={d}/old/checkpoints/step_00000010", NPROC_PER_NODE="2")),
    Case("bare_key_override", [*TRAIN, "lr=1e-3"], "did you mean optim.lr=1e-3?"),
    Case("config_key_as_a_flag", ["train", "--config", CONFIG, "--max_steps", "10"],
         "'--max_steps' is not an option: config keys are key=value overrides, e.g. train.max_steps=10"),
    Case("precision_unknown", [*TRAIN, "train.precision=fp8"], "expected one of auto, fp32 (or no), bf16, fp16"),
    # ---- DeepSpeed: a JSON that contradicts the config names the key to change ---------------------------
    Case("ds_batch_size", fragment="sets train_batch_size=64, but train.global_batch_size gives 32",
         **deepspeed('{"train_batch_size": 64}')),
    Case("ds_accumulation", fragment="sets gradient_accumulation_steps=4, but train.grad_accum_steps gives 1",
         **deepspeed('{"gradient_accumulation_steps": 4}')),
    Case("ds_micro_batch", fragment="train_micro_batch_size_per_gpu=5", **deepspeed('{"train_micro_batch_size_per_gpu": 5}')),
    Case("ds_clipping", fragment="sets gradient_clipping=0.5, but clip.max_norm gives 1.0",
         **deepspeed('{"gradient_clipping": 0.5}')),
    Case("ds_clipping_with_policy_none", fragment="clip.policy=none gives 0.0",
         **deepspeed('{"gradient_clipping": 1.0}', "clip.policy=none")),
    Case("ds_precision", fragment="sets bf16.enabled=true, but train.precision=no gives false",
         **deepspeed('{"bf16": {"enabled": true}}', "train.precision=no")),
    Case("ds_both_precisions", fragment="enables both bf16 and fp16",
         **deepspeed('{"bf16": {"enabled": true}, "fp16": {"enabled": true}}')),
    # Only where this CPU's oneDNN lacks fp16 (DeepSpeed then trains fp16 here); the refusal itself is tested
    # on any CPU by test_deepspeed_fp16_is_refused_where_onednn_lacks_it.
    *([] if _onednn_fp16() else [Case("ds_fp16_on_this_cpu", fragment="this CPU's does not",
                                      **deepspeed('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}'))]),
    Case("ds_stage0_fp16", fragment="ZeRO stage 0 in fp16 is refused", **deepspeed('{"fp16": {"enabled": true}}')),
    Case("ds_config_without_the_strategy", [*TRAIN, "dist.deepspeed_config=ds.json"],
         "dist.strategy is auto, which does not use it", files={"ds.json": "{}"}),
    Case("ds_optimizer_lr", fragment="sets optimizer.params.lr=0.1, but optim.lr gives 0.003",
         **deepspeed('{"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}')),
    Case("ds_optimizer_type", fragment="optimizer type \"Lamb\"", **deepspeed('{"optimizer": {"type": "Lamb"}}')),
    Case("ds_scheduler", fragment="remove the 'scheduler' section",
         **deepspeed('{"scheduler": {"type": "WarmupLR"}}')),
    Case("ds_wandb_monitor", fragment="wandb.enabled=true; dist_train logs itself",
         **deepspeed('{"wandb": {"enabled": true}}')),
    Case("ds_stage_5", fragment="zero_optimization.stage must be 0, 1, 2 or 3",
         **deepspeed('{"zero_optimization": {"stage": 5}}')),
    Case("ds_offload", fragment="offload_optimizer is not supported",
         **deepspeed('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')),
    Case("ds_no_norm", fragment="compute_grad_norm=false leaves no gradient norm",
         **deepspeed('{"zero_optimization": {"stage": 2, "compute_grad_norm": false}}')),
    Case("ds_unfilled_auto", fragment="zero_optimization.reduce_bucket_size is \"auto\"",
         **deepspeed('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}')),
    Case("ds_bf16_overflow_check_off", fragment="bf16.check_grad_overflow=false lets a NaN/Inf gradient",
         **deepspeed('{"bf16": {"enabled": true, "check_grad_overflow": false}}')),
    Case("ds_not_json", fragment="is not valid JSON", **deepspeed('{"zero_optimization": ')),
    Case("ds_json_list", fragment="must hold a JSON object", **deepspeed("[1, 2]")),
    Case("ds_json_missing", [*TRAIN, "dist.strategy=deepspeed", "dist.deepspeed_config=missing.json"],
         "'missing.json' not found"),
    Case("ds_replica_check_zero3", fragment="fp32 weights are partitioned",
         **deepspeed('{"zero_optimization": {"stage": 3}}', "dist.check_sync_every=5")),
    Case("ds_clip_eps", fragment="clips with eps 1e-6", **deepspeed(None, "clip.eps=1e-4")),
    # ---- launch/deepspeed.sh ----------------------------------------------------------------------------
    Case("ds_launch_launcher", fragment="LAUNCHER must be deepspeed or torchrun", **ds_launch(LAUNCHER="mpi")),
    Case("ds_launch_nproc_zero", fragment="NUM_PROCESSES must be a whole number >= 1",
         **ds_launch(NUM_PROCESSES="0")),
    Case("ds_launch_config_missing", fragment="DS_CONFIG=nope.json is not a file", **ds_launch(DS_CONFIG="nope.json")),
    Case("ds_launch_hostfile_missing", fragment="HOSTFILE=nope is not a file", **ds_launch(HOSTFILE="nope")),
    Case("ds_launch_hostfile_and_nproc", fragment="set NUM_PROCESSES or HOSTFILE, not both",
         files={"hosts": "localhost slots=2\n"}, **ds_launch(HOSTFILE="{d}/hosts", NUM_PROCESSES="2")),
    Case("ds_launch_hostfile_without_slots", fragment="has no line of the form 'hostname slots=N'",
         files={"hosts": "localhost\n"}, **ds_launch(HOSTFILE="{d}/hosts")),
    Case("ds_launch_port", fragment="MASTER_PORT must be a port number", **ds_launch(MASTER_PORT="http")),
    Case("ds_launch_torchrun_with_nproc", fragment="NUM_PROCESSES is for LAUNCHER=deepspeed",
         **ds_launch(LAUNCHER="torchrun", NUM_PROCESSES="2")),
    Case("ds_launch_bad_json", fragment="sets train_batch_size=64", fragment_from_cli=True,
         files={"ds.json": '{"train_batch_size": 64}'}, **ds_launch(DS_CONFIG="{d}/ds.json", NUM_PROCESSES="2")),
    # ---- positive controls ----------------------------------------------------------------------------
    Case("ok_ds_json_without_clipping", ["train", "--check", "--config", CONFIG, "run.out_dir=out",
                                         "dist.strategy=deepspeed", "dist.deepspeed_config=ds.json"],
         files={"ds.json": '{"zero_optimization": {"stage": 1}, "train_batch_size": 32, "gradient_clipping": "auto",'
                           ' "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95]}}}'},
         code=0, control=_config_ok),
    Case("ok_precision_no", ["train", "--check", "--config", CONFIG, "run.out_dir=out", "train.precision=no"],
         code=0, control=_config_ok),
    Case("ok_precision_fp32", ["train", "--check", "--config", CONFIG, "run.out_dir=out", "train.precision=fp32"],
         code=0, control=_config_ok),
    Case("ok_factory_padded_vocab", with_factory(), code=0, control=_trained,
         files=factory("class M(nn.Module):\n"
                       "    def __init__(self, v):\n"
                       "        super().__init__()\n"
                       "        self.emb = nn.Embedding(v, 8)\n"
                       "        self.head = nn.Linear(8, v)\n"
                       "    def forward(self, idx):\n"
                       "        return self.head(self.emb(idx))\n\n"
                       "def build(cfg, vocab_size):\n"
                       "    assert vocab_size == 32\n"
                       "    return M(40)\n")),
    Case("ok_token_file", [*TRAIN, "data.token_file=t.bin"], code=0, control=_trained, files=tokens("t", 2000)),
    Case("ok_adaptive_and_forensics", [*TRAIN, "clip.policy=zscore", "clip.warmup_steps=1", "clip.skip_sigma=6",
                                       "clip.skip_min_steps=1", "logging.per_layer_every=1",
                                       "data.skip_steps_file=s.jsonl"], code=0, control=_trained,
         files={"s.jsonl": '{"step": 2, "batch": 2}\n'}),
    Case("ok_prepare", ["prepare", "in", "t.bin"], code=0, control=_prepared,
         files={"in/a.txt": "ab\n", "in/b.txt": "ba"}),
    Case("ok_plot_truncated_last_line", ["plot", "run"], code=0, control=_plotted("incomplete line"),
         files={"run/metrics.jsonl": GOOD_LINES + RECORD[:30]}),
    Case("ok_plot_null_norms", ["plot", "run"], code=0, control=_plotted(None),
         files={"run/metrics.jsonl": "".join(NULL_RECORD % s + "\n" for s in (1, 2, 3))}),
]
BAD = [c for c in CASES if c.control is None]
GOOD = [c for c in CASES if c.control is not None]


def _make(d: Path, files: dict) -> None:
    for rel, content in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            p.mkdir()
        elif content == FIFO:
            os.mkfifo(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def listing(d: Path) -> list[str]:
    """Every path under `d`, recursively, relative and sorted (a directory ends in '/')."""
    return sorted(str(p.relative_to(d)) + ("/" if p.is_dir() and not p.is_symlink() else "")
                  for p in d.rglob("*"))


@dataclass
class Result:
    dir: Path
    before: list[str]
    after: list[str]
    proc: subprocess.CompletedProcess
    seconds: float


def _run(case: Case, base: Path) -> Result:
    d = base / case.name
    d.mkdir()
    _make(d, case.files)
    before = listing(d)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k not in LAUNCHER_VARS + LAUNCH_VARS + case.unset}
    # Bytecode of an imported factory module would land in the case dir; that is Python's, not ours.
    env.update({"WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    env.update({k: v.format(d=d) for k, v in case.env.items()})
    args = [a.format(d=d) for a in case.args]
    t0 = time.monotonic()
    try:
        if case.launch:
            # The script's own `$PYTHON -m dist_train ... --check` is forked warm (tests/bin/python); its
            # launcher is the real interpreter.
            env["PYTHON"] = str(SHIMS / "python")
            proc = subprocess.run(["bash", case.script, *args], cwd=d, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT)
        elif case.name in FRESH:
            proc = subprocess.run([sys.executable, "-m", "dist_train", *args], cwd=d, env=env, capture_output=True,
                                  text=True, timeout=TIMEOUT)
        else:
            proc = forkserver.run(args, cwd=d, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:  # a hang (a FIFO opened for reading) is a failure, not a stuck suite
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        proc = subprocess.CompletedProcess(e.cmd, None, out, err + f"\n<timed out after {TIMEOUT} s>")
    return Result(d, before, listing(d), proc, time.monotonic() - t0)


@pytest.fixture(scope="module")
def results(request):
    """Every selected case's result, by name; the processes run 4 at a time."""
    # Only the cases whose tests were collected (-k), so that one case can be rerun on its own.
    selected = {item.callspec.params["case"].name for item in request.session.items
                if isinstance(getattr(getattr(item, "callspec", None), "params", {}).get("case"), Case)}
    # The few that train (and import far more) first, so that they do not trail at the end.
    wanted = sorted((c for c in CASES if c.name in selected), key=lambda c: c.code != 1 and c.control is None)
    with tempfile.TemporaryDirectory(prefix="dist_train_bad_input_") as tmp:
        base = Path(tmp)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = {c.name: pool.submit(_run, c, base) for c in wanted}
            yield {name: f.result() for name, f in futures.items()}


def _shown(r: Result) -> str:
    return f"exit {r.proc.returncode}\n--- stdout\n{r.proc.stdout}--- stderr\n{r.proc.stderr}"


def test_at_least_45_bad_inputs():
    assert len(BAD) >= 45
    assert len({c.name for c in CASES}) == len(CASES)
    assert set(FRESH) <= {c.name for c in CASES}


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_input_is_one_line_and_writes_nothing(case: Case, results):
    r = results[case.name]
    p, shown = r.proc, _shown(r)
    assert p.returncode == case.code, shown
    lines = p.stderr.splitlines()
    if case.traceback:
        assert "Traceback" in p.stderr, shown
        assert [line for line in lines if line.startswith(ERROR)] == [lines[-1]], shown
        line = lines[-1]
    elif case.during_training:
        assert [line for line in lines if line.startswith(ERROR)] == [lines[-1]], shown
        assert all(line.startswith("dist-train: ") for line in lines), shown
        assert "Traceback" not in p.stdout + p.stderr, shown
        line = lines[-1]
    else:
        assert len(lines) == 1, shown
        line = lines[0]
        assert "Traceback" not in p.stdout + p.stderr, shown
    assert line.startswith(case.prefix) and line[len(case.prefix):].strip(), shown
    assert case.fragment in line, shown
    for bad in case.forbid:
        assert bad not in line, shown
    assert r.after == r.before, shown


@pytest.mark.parametrize("case", GOOD, ids=[c.name for c in GOOD])
def test_positive_control(case: Case, results):
    r = results[case.name]
    assert r.proc.returncode == case.code, _shown(r)
    case.control(r.dir, r.proc)


def test_deepspeed_fp16_is_refused_where_onednn_lacks_it(tmp_path, monkeypatch):
    import dist_train.strategies
    from dist_train.preflight import load_config
    from dist_train.errors import ConfigError

    (tmp_path / "ds.json").write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    monkeypatch.setattr(dist_train.strategies, "cpu_fp16_supported", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="this CPU's does not"):
        load_config(CONFIG, ["dist.strategy=deepspeed", f"dist.deepspeed_config={tmp_path / 'ds.json'}"])
