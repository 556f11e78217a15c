"""Tasks and data a user has: the article's CNN with SGD against a plain-torch loop, on one process, two DDP
ranks, FSDP2 and with accumulation; exact evaluation across ranks; a Hugging Face GPT-2 with no wrapper;
SGD's sync-free skip.

Each guarantee has the mistake it catches next to it: clipping each micro-batch, clipping before the
all-reduce and a padding sampler are computed here and shown to miss the numbers the runs match.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dist_train.clip import FixedClip
from dist_train.step import Strategy, folds_clipping, train_step
from examples.seed_cnn import Net, write
from tests.conftest import ROOT, checkpoint_params, cli, torchrun_cli
from tests.dist_utils import spawn

SEED_CNN = str(ROOT / "configs/seed_cnn.yaml")
TRAIN_N, VAL_N = 64, 37  # 37 validation samples: not a multiple of 2 ranks x a micro-batch of 8
STEPS, BATCH, MAX_NORM, LR = 6, 16, 0.5, 0.01  # 4 steps an epoch: step 5 starts the second pass


@pytest.fixture(scope="module")
def seed_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("seed_cnn_data")
    write(d, TRAIN_N, VAL_N, 0)
    return d


def cnn_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "-c", SEED_CNN, f"run.out_dir={out}", f"data.file={data / 'train_data.pth'}",
            f"data.val_file={data / 'val_data.pth'}", "train.epochs=null", f"train.max_steps={STEPS}",
            "data.shuffle=false", f"clip.max_norm={MAX_NORM}", "logging.every=1", "logging.wandb.mode=disabled",
            "logging.progress=plain", *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def reference(data: Path, accum: int = 1, world: int = 1, clip_each_micro: bool = False,
              clip_before_allreduce: bool = False, loss_fn=F.cross_entropy) -> tuple[list[dict], dict]:
    """The article's loop, fixed, in plain torch: DataLoader(shuffle=False), cross-entropy, clip_grad_norm_ on
    the whole batch's gradient, optim.SGD, the model built right after torch.manual_seed(0). `world` ranks and
    `accum` micro-batches each are simulated by cutting the batch; the two mistakes are options."""
    images, labels = torch.load(data / "train_data.pth", weights_only=True)
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=False)
    out = []
    batches = [b for _ in range(math.ceil(STEPS / len(loader))) for b in loader][:STEPS]
    params = list(net.parameters())
    for x, y in batches:
        parts = list(zip(x.chunk(world * accum), y.chunk(world * accum)))
        total = torch.zeros(())
        grads = [torch.zeros_like(p) for p in params]
        for r in range(world):  # each rank's gradient: the mean over its micro-batches
            local = [torch.zeros_like(p) for p in params]
            for xm, ym in parts[r * accum:(r + 1) * accum]:
                opt.zero_grad()
                loss = loss_fn(net(xm), ym)
                loss.backward()
                g = [p.grad.detach() / accum for p in params]
                if clip_each_micro:  # the mistake: clip inside accumulation
                    n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
                    g = [t * min(1.0, MAX_NORM / (float(n) * accum + 1e-6)) for t in g]
                local = [a + b for a, b in zip(local, g)]
                total += loss.detach() / (world * accum)
            if clip_before_allreduce:  # the mistake: clip the local gradient, then average
                n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in local]))
                local = [t * min(1.0, MAX_NORM / (float(n) + 1e-6)) for t in local]
            grads = [a + b / world for a, b in zip(grads, local)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        raw = torch.nn.utils.clip_grad_norm_(params, MAX_NORM) if not (clip_each_micro or clip_before_allreduce) \
            else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = min(1.0, MAX_NORM / (float(raw) + 1e-6))
        out.append({"train/loss": float(total), "grad_norm/raw": float(raw),
                    "grad_norm/clipped": float(raw) * (coef if not (clip_each_micro or clip_before_allreduce) else 1)})
        opt.step()
    return out, {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_rows_match(got: list[dict], want: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r, w in zip(got, want):
        for key in ("train/loss", "grad_norm/raw", "grad_norm/clipped"):
            assert r[key] == pytest.approx(w[key], rel=rel), f"step {r['step']} {key}: {r[key]} vs {w[key]}"


def differs(got: list[dict], want: list[dict], rel: float = 1e-3) -> bool:
    return any(r[k] != pytest.approx(w[k], rel=rel) for r, w in zip(got, want)
               for k in ("grad_norm/raw", "grad_norm/clipped", "train/loss"))


@pytest.fixture(scope="module")
def cnn_runs(seed_data, tmp_path_factory):
    """The article's model through the CLI: one process, accumulation 2, two DDP ranks, FSDP2 over two."""
    root = tmp_path_factory.mktemp("cnn_runs")
    out = {}
    p = cli(*cnn_args(seed_data, root / "single"))
    assert p.returncode == 0, p.stderr
    out["single"] = (root / "single", p)
    p = cli(*cnn_args(seed_data, root / "accum2", "train.grad_accum_steps=2"))
    assert p.returncode == 0, p.stderr
    out["accum2"] = (root / "accum2", p)
    for name, strategy in (("ddp", "ddp"), ("fsdp", "fsdp")):
        p = torchrun_cli(*cnn_args(seed_data, root / name, f"dist.strategy={strategy}"), nproc=2)
        assert p.returncode == 0, p.stderr
        out[name] = (root / name, p)
    return out


def test_article_model_matches_a_plain_torch_loop_step_by_step(seed_data, cnn_runs):
    run, p = cnn_runs["single"]
    want, weights = reference(seed_data)
    assert any(w["grad_norm/clipped"] < w["grad_norm/raw"] * 0.99 for w in want)  # clipping is at work
    assert_rows_match(rows(run), want)
    got = checkpoint_params(run)
    for name, w in weights.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert "task classify (10 classes, cross-entropy; accuracy)" in p.stderr
    assert "optimizer sgd (no momentum), lr 0.01" in p.stderr


@pytest.mark.parametrize("name", ["accum2", "ddp", "fsdp"])
def test_ranks_and_micro_batches_give_the_same_run(seed_data, cnn_runs, name):
    run, p = cnn_runs[name]
    accum, world = (2, 1) if name == "accum2" else (1, 2)
    want, _ = reference(seed_data, accum=accum, world=world)
    # FSDP2's norm is the root of the sum of its shards' squared norms, each taken in fp32: torch's fp32 norm
    # of a large CPU tensor is itself only accurate to ~2e-5 relative (measured on fc1's gradient shard, 1M
    # values: 1.0056386 in fp32 against 1.0056595 in fp64), so a norm over two halves and clip_grad_norm_'s
    # over the whole tensor differ by that much (2.4e-5 at step 1), each as far from the exact value. The
    # gradients themselves agree to 2e-6 (the mistakes below are off by more than 1e-2).
    rel = 5e-5 if name == "fsdp" else 1e-5
    assert_rows_match(rows(run), want, rel=rel)
    assert_rows_match(rows(run), rows(cnn_runs["single"][0]), rel=rel)
    if name == "fsdp":
        assert "FSDP2 over 2 processes (1 units" in p.stderr  # a CNN without a ModuleList: one unit, the root


def test_the_mistakes_miss_those_numbers(seed_data, cnn_runs):
    """Negative controls: clipping each micro-batch, or each rank's gradient before the all-reduce, gives other
    numbers than the runs above match, by far more than the tolerance."""
    assert differs(rows(cnn_runs["accum2"][0]), reference(seed_data, accum=2, clip_each_micro=True)[0])
    assert differs(rows(cnn_runs["ddp"][0]), reference(seed_data, world=2, clip_before_allreduce=True)[0])


# ---- every strategy --------------------------------------------------------------------------------------
DS_JSON = ROOT / "configs/deepspeed"
#: name -> (how it is launched, its overrides). Each trains the article's model 6 steps over 2 processes and
#: evaluates at the end; ZeRO-1 with SGD's momentum (a client optimizer DeepSpeed's ZeRO has not "tested").
STRATEGIES = {
    "accelerate": ("accelerate", []),
    "zero0": ("torchrun", ["dist.strategy=deepspeed", f"dist.deepspeed_config={DS_JSON / 'zero0.json'}"]),
    "zero1_momentum": ("torchrun", ["dist.strategy=deepspeed", f"dist.deepspeed_config={DS_JSON / 'zero1.json'}",
                                    "optim.momentum=0.9"]),
    "zero3": ("torchrun", ["dist.strategy=deepspeed", f"dist.deepspeed_config={DS_JSON / 'zero3.json'}",
                           "logging.per_layer_every=3"]),
    "fsdp_momentum": ("torchrun", ["dist.strategy=fsdp", "optim.momentum=0.9"]),
    "ddp_per_layer_zscore": ("torchrun", ["logging.per_layer_every=3", "clip.policy=zscore", "clip.warmup_steps=2",
                                          "clip.skip_sigma=6", "clip.skip_min_steps=2", "clip.skip_window=4"]),
}


@pytest.fixture(scope="module")
def strategy_runs(seed_data, tmp_path_factory):
    import subprocess

    from tests.conftest import _command_env, warm_launch_env

    root = tmp_path_factory.mktemp("strategy_runs")
    runs = {"single_momentum": cli(*cnn_args(seed_data, root / "single_momentum", "optim.momentum=0.9"))}
    runs["single_zscore"] = cli(*cnn_args(seed_data, root / "single_zscore", *STRATEGIES["ddp_per_layer_zscore"][1]))
    bf16 = ["dist.strategy=deepspeed", f"dist.deepspeed_config={DS_JSON / 'zero2_bf16.json'}"]
    runs["zero2_bf16"] = torchrun_cli(*cnn_args(seed_data, root / "zero2_bf16", *bf16), nproc=2)
    for name, (how, extra) in STRATEGIES.items():
        args = cnn_args(seed_data, root / name, *extra)
        if how == "torchrun":
            runs[name] = torchrun_cli(*args, nproc=2)
        else:  # the real launch script; its launcher and workers forked warm (its fresh run: test_strategies)
            env = warm_launch_env(_command_env({"NUM_PROCESSES": "2", "CONFIG": SEED_CNN}))
            runs[name] = subprocess.run(["bash", "launch/accelerate.sh", *args[3:]], cwd=ROOT, env=env,
                                        capture_output=True, text=True, timeout=300)
    for name, p in runs.items():
        assert p.returncode == 0, f"{name}: {p.stdout}{p.stderr}"
    return root, runs


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_article_model_on_every_strategy(seed_data, cnn_runs, strategy_runs, name):
    """The same steps and the same evaluation as one process, on Accelerate, DeepSpeed ZeRO 0, 1 (SGD with
    momentum, DeepSpeed's client optimizer) and 3, and DDP with per-layer norms, zscore and spike skipping."""
    root, runs = strategy_runs
    base = {"zero1_momentum": "single_momentum", "fsdp_momentum": "single_momentum",
            "ddp_per_layer_zscore": "single_zscore"}.get(name)
    want = rows(root / base) if base else rows(cnn_runs["single"][0])
    got = rows(root / name)
    # ZeRO 1-3 take the norm over each rank's flat fp32 partition of the whole model (about 1.07M values):
    # torch's fp32 norm of a tensor that size is accurate to a few 1e-5 (see test_ranks_and_micro_batches_...;
    # measured here: 4.5e-5 at step 1), against clip_grad_norm_'s per-tensor norms in the one process.
    rel = 1e-4 if name in ("zero1_momentum", "zero3", "fsdp_momentum") else 1e-5
    assert_rows_match(got, want, rel=rel)
    for key in ("eval/loss", "eval/accuracy"):
        assert got[-1][key] == pytest.approx(want[-1][key], rel=rel, abs=1e-7), key
    if name == "zero3":
        assert "logging.per_layer_every logs nothing under DeepSpeed" in runs[name].stderr
    if name == "ddp_per_layer_zscore":
        layers = [json.loads(line) for line in (root / name / "per_layer.jsonl").read_text().splitlines()]
        assert [r["step"] for r in layers] == [3, 6]
        assert {k.split("/")[1] for k in layers[0] if k != "step"} == {"conv1", "conv2", "fc1", "fc2"}
        assert "clip/spike_limit" in got[-1] and "clip/ema_mean" in got[-1]


def test_the_article_model_resumes_exactly_with_data_workers(seed_data, tmp_path):
    """Stopped by SIGTERM after step 4, resumed with train.resume=auto: SGD's momentum buffers, the data workers'
    position and the evaluation continue as if never stopped (every number equal)."""
    from tests.test_resume import assert_resumed_equals, stopped_step

    extra = ("model.factory=tests.helpers:signal_net", "optim.momentum=0.9", "data.num_workers=2")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli(*cnn_args(seed_data, ref, *extra)).returncode == 0
    k = stopped_step(cli(*cnn_args(seed_data, run, *extra), env={"STOP_AT_CALL": "3"}))
    assert k == 4
    p = cli(*cnn_args(seed_data, run, *extra, "train.resume=auto"))
    assert p.returncode == 0, p.stderr
    assert_resumed_equals(run, ref, k)
    assert rows(run)[-1]["eval/loss"] == rows(ref)[-1]["eval/loss"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_verify_passes_on_the_article_model(seed_data, strategy):
    """`dist-train verify` on the classify task: 2 ranks against its single-process reference, step by step."""
    p = torchrun_cli("verify", "-c", SEED_CNN, f"data.file={seed_data / 'train_data.pth'}",
                     f"data.val_file={seed_data / 'val_data.pth'}", f"dist.strategy={strategy}", "--steps", "3",
                     nproc=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verdict: PASS" in p.stdout


def test_deepspeed_bf16_casts_the_images_to_the_engines_dtype(cnn_runs, strategy_runs):
    """DeepSpeed runs bf16 without autocast, casting the weights: fp32 images would fail in the first conv. They
    are cast too (Strategy.cast_inputs), and the run follows the fp32 one within bf16's rounding (8 bits)."""
    root, runs = strategy_runs
    assert "ZeRO stage 2 over 2 processes (bf16" in runs["zero2_bf16"].stderr
    got, want = rows(root / "zero2_bf16"), rows(cnn_runs["single"][0])
    for r, w in zip(got, want):
        assert r["train/loss"] == pytest.approx(w["train/loss"], rel=2e-2)
        assert r["grad_norm/raw"] == pytest.approx(w["grad_norm/raw"], rel=5e-2)
    assert got[0]["train/loss"] != want[0]["train/loss"]  # bf16 really ran


def test_a_custom_loss_with_a_metric_of_its_own(seed_data, tmp_path):
    """task.loss replaces the task's loss: the run follows a plain loop with the same loss, and the loss's own
    metric is logged as train/<name> and eval/<name>, the evaluation's equal to one computed here from the
    final weights."""
    from tests.helpers import smoothed_loss

    run = tmp_path / "run"
    p = cli(*cnn_args(seed_data, run, "task.loss=tests.helpers:smoothed_loss"))
    assert p.returncode == 0, p.stderr
    assert "task custom loss tests.helpers:smoothed_loss" in p.stderr
    smooth = functools.partial(F.cross_entropy, label_smoothing=0.1)
    want, _ = reference(seed_data, loss_fn=smooth)
    got = rows(run)
    assert_rows_match(got, want)
    assert all(0 <= r["train/top2"] <= 1 for r in got)
    net = Net().eval()
    net.load_state_dict(checkpoint_params(run))
    images, labels = torch.load(seed_data / "val_data.pth", weights_only=True)
    with torch.no_grad():
        loss, extra = smoothed_loss(net, (images, labels))
    assert got[-1]["eval/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert got[-1]["eval/top2"] == pytest.approx(extra["top2"].item(), rel=1e-6)


def test_epochs_evaluate_at_each_epochs_end_and_val_fraction_holds_out(seed_data, tmp_path):
    """train.epochs=2 over 48 training samples of batch 8: 12 steps, an evaluation and an epoch line at steps 6
    and 12;
    data.val_fraction holds out a quarter of data.file (16 of 64, by the seed) instead of data.val_file (and
    eval.max_batches=1 evaluates the first 8 of them)."""
    run = tmp_path / "run"
    p = cli("train", "-c", SEED_CNN, f"run.out_dir={run}", f"data.file={seed_data / 'train_data.pth'}",
            "data.val_file=null", "data.val_fraction=0.25", "eval.max_batches=1", "train.epochs=2",
            "logging.every=100", "logging.wandb.mode=disabled", "logging.progress=plain", "train.global_batch_size=8")
    assert p.returncode == 0, p.stderr
    assert "48 training samples (data.file" in p.stderr and "16 validation samples" in p.stderr
    got = rows(run)
    assert [r["step"] for r in got] == [6, 12]  # 48 // 8 = 6 steps an epoch
    assert all(r["eval/loss"] is not None and r["train/epoch"] in (1.0, 2.0) for r in got)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("dist-train: epoch ")]
    assert [ln.split(":")[1].strip() for ln in lines] == ["epoch 1/2", "epoch 2/2"], lines
    assert "train loss" in lines[-1] and "eval/loss" in lines[-1] and "eval/accuracy" in lines[-1]


# ---- evaluation ------------------------------------------------------------------------------------------
def _evaluate(data: str, world_overrides: list[str]) -> dict:
    """On each rank: the built setup's evaluation (every rank gets the totals), and the plain-torch numbers."""
    from dist_train.distributed import DistState
    from dist_train.preflight import load_config
    from dist_train.trainer import build
    from dist_train.trainer.evaluate import evaluate

    cfg = load_config(SEED_CNN, [f"data.file={data}/train_data.pth", f"data.val_file={data}/val_data.pth",
                                 "logging.wandb.mode=disabled", *world_overrides])
    state = DistState.from_env()
    with state.session(torch.device("cpu"), "gloo", 60):
        s = build(cfg, state, torch.device("cpu"))
        return evaluate(s)


def _padded(data: str) -> dict:
    """What a DistributedSampler over 2 ranks evaluates: its padding repeats samples to even the parts out."""
    from torch.utils.data.distributed import DistributedSampler

    images, labels = torch.load(f"{data}/val_data.pth", weights_only=True)
    torch.manual_seed(0)
    net = Net().eval()
    idx = [i for r in range(2) for i in DistributedSampler(range(len(labels)), 2, r, shuffle=False)]
    with torch.no_grad():
        logits = net(images[idx])
    return {"eval/loss": F.cross_entropy(logits, labels[idx]).item(),
            "eval/accuracy": (logits.argmax(1) == labels[idx]).float().mean().item()}


def test_evaluation_is_exact_on_any_number_of_ranks(seed_data):
    data = str(seed_data)
    single = spawn(_evaluate, 1, data, [])[0]
    two = spawn(_evaluate, 2, data, [])
    assert two[0] == two[1]  # every rank has the totals
    images, labels = torch.load(seed_data / "val_data.pth", weights_only=True)
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        logits = net(images)
    independent = {"eval/loss": F.cross_entropy(logits, labels).item(),
                   "eval/accuracy": (logits.argmax(1) == labels).float().mean().item()}
    assert set(single) == {"eval/loss", "eval/accuracy"}
    for key, value in independent.items():
        assert single[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
        assert two[0][key] == pytest.approx(single[key], rel=1e-6, abs=1e-7), key
    padded = _padded(data)  # negative control: counting repeated samples misses the single process's numbers
    assert any(padded[k] != pytest.approx(single[k], rel=1e-6, abs=1e-7) for k in single)


# ---- SGD -------------------------------------------------------------------------------------------------
def _sgd(model, fused=True):
    from dist_train.config import OptimConfig, OptimName
    from dist_train.optim import build_optimizer

    return build_optimizer(OptimConfig(name=OptimName.sgd, lr=0.1, momentum=0.9), model.parameters(), fused)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _state(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()])


@pytest.mark.parametrize("nan_at", [0, 2])
def test_sgd_momentum_skips_a_nan_step_untouched_and_reads_nothing(nan_at):
    """A planted NaN (on the first step, where torch's fused SGD would create its momentum buffers, and later)
    changes neither parameters nor momentum buffers; no step reads a value back to the host."""
    from tests.test_fused_step import SyncCounter

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = _sgd(model)
    assert folds_clipping(opt)
    counter = SyncCounter()
    for i in range(4):
        before = _state(model, opt)
        batch = _batch(i)
        if i == nan_at:
            batch = (batch[0] * float("nan"), batch[1])
        with counter:
            m = train_step(model, opt, [batch], FixedClip(0.5), loss_fn=_loss, strategy=Strategy())
        after = _state(model, opt)
        if i == nan_at:
            assert bool(m.skipped)
            for a, b in zip(before[0] + before[1], after[0] + after[1]):
                assert torch.equal(a, b)
        else:
            assert not bool(m.skipped) and not torch.equal(before[0][0], after[0][0])
    assert sum(counter.by_step.values()) == 0, counter.by_step


def test_sgd_matches_torch_sgd_and_the_unprimed_fused_sgd_is_the_bug():
    """Primed momentum buffers change no number against torch's own SGD; negative control: torch 2.13's fused
    SGD without them, told to skip its first step, still creates its buffers (with empty_like, never written):
    a skipped step that changes the optimizer's state."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    ours, plain = _sgd(a), torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        for model, opt in ((a, ours), (b, plain)):
            opt.zero_grad()
            _loss(model, _batch(i)).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    c = torch.nn.Linear(6, 3)
    bare = torch.optim.SGD(c.parameters(), lr=0.1, momentum=0.9, fused=True)
    assert not folds_clipping(bare)  # the step takes the explicit path for it
    for p in c.parameters():
        p.grad = torch.ones_like(p)
    bare.grad_scale, bare.found_inf = torch.ones(()), torch.ones(())
    bare.step()  # skipped, yet its buffers now exist, as empty_like left them
    assert all(bare.state[p].get("momentum_buffer") is not None for p in c.parameters())
    primed = _sgd(c)
    primed.grad_scale, primed.found_inf = torch.ones(()), torch.ones(())
    primed.step()
    assert all(torch.equal(primed.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in c.parameters())


# ---- Hugging Face GPT-2, no wrapper ---------------------------------------------------------------------
DEBUG = str(ROOT / "configs/debug.yaml")
HF_STEPS = 4
HF = ["model.factory=examples.hf_gpt2:gpt2", "model.n_layer=1", "model.d_model=32", f"train.max_steps={HF_STEPS}",
      "train.global_batch_size=8", "optim.warmup_steps=0", "optim.schedule=constant", "clip.max_norm=0.5",
      "data.shuffle=false", "logging.every=1", "logging.wandb.mode=disabled", "logging.progress=plain",
      "train.checkpoint=false"]
HF_MODEL = [*HF, "data.factory=examples.hf_gpt2:progressions", "data.vocab_size=32", "data.num_samples=40"]


def hf_reference(kind: str) -> list[dict]:
    """A plain loop: the same GPT-2 built after torch.manual_seed(0), torch's AdamW, clip_grad_norm_, the samples
    in order; the loss from `.logits` (lm) or `model(**batch).loss` (model)."""
    from dist_train.config import ModelConfig
    from dist_train.data import synthetic_dataset
    from examples.hf_gpt2 import Progressions, gpt2

    cfg = ModelConfig(n_layer=1, d_model=32, n_head=4, block_size=32)
    torch.manual_seed(0)
    model = gpt2(cfg, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    if kind == "lm":
        data = synthetic_dataset(65536, 32, 32, 0)
    else:
        data = Progressions(40, 32, 32, 0)
    out = []
    for step in range(HF_STEPS):
        idx = torch.arange(step * 8, (step + 1) * 8)
        if kind == "lm":
            w = data.windows(idx)
            logits = model(w[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1))
        else:
            loss = model(input_ids=data.ids[idx], labels=data.ids[idx]).loss
        opt.zero_grad()
        loss.backward()
        raw = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        out.append({"train/loss": loss.item(), "grad_norm/raw": raw,
                    "grad_norm/clipped": raw * min(1.0, 0.5 / (raw + 1e-6))})
        opt.step()
    return out


def hf_rows(run: Path) -> list[dict]:
    got = rows(run)
    assert [r["step"] for r in got] == list(range(1, HF_STEPS + 1))
    return got


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    runs = {}
    for name, args, nproc in (("lm", HF, 1), ("model", HF_MODEL, 1), ("lm_ddp", HF, 2), ("model_ddp", HF_MODEL, 2),
                              ("lm_deepspeed", [*HF, "dist.strategy=deepspeed"], 2),
                              ("model_deepspeed", [*HF_MODEL, "dist.strategy=deepspeed"], 2),
                              ("model_fsdp", [*HF_MODEL, "dist.strategy=fsdp"], 2),
                              ("model_zero3", [*HF_MODEL, "dist.strategy=deepspeed",
                                               f"dist.deepspeed_config={DS_JSON / 'zero3.json'}"], 2)):
        argv = ["train", "-c", DEBUG, f"run.out_dir={root / name}", *args]
        p = cli(*argv) if nproc == 1 else torchrun_cli(*argv, nproc=nproc)
        assert p.returncode == 0, p.stderr
        runs[name] = (root / name, p)
    return runs


@pytest.mark.parametrize("name", ["lm", "lm_ddp", "lm_deepspeed"])
def test_hugging_face_gpt2_as_lm_with_no_wrapper(hf_runs, name):
    run, p = hf_runs[name]
    want = hf_reference("lm")
    for r, w in zip(hf_rows(run), want):
        for key in w:
            assert r[key] == pytest.approx(w[key], rel=1e-5), f"step {r['step']} {key}"
    assert "task lm (next-token cross-entropy, vocabulary 32) (task.name=auto)" in p.stderr


@pytest.mark.parametrize("name", ["model", "model_ddp", "model_deepspeed", "model_fsdp", "model_zero3"])
def test_hugging_face_gpt2_computing_its_own_loss(hf_runs, name):
    run, p = hf_runs[name]
    want = hf_reference("model")
    got = hf_rows(run)
    # the norm over shards in fp32: see test_ranks_and_micro_batches_give_the_same_run
    rel = {"model_fsdp": 5e-5, "model_zero3": 1e-4}.get(name, 1e-5)
    for r, w in zip(got, want):
        for key in w:
            assert r[key] == pytest.approx(w[key], rel=rel), f"step {r['step']} {key}"
    if name == "model_fsdp":
        assert "FSDP2 over 2 processes (2 units" in p.stderr  # transformer.h's one block, and the root
    assert "task model (the model's own loss) (task.name=auto)" in p.stderr
    assert got[-1]["eval/loss"] is not None and math.isfinite(got[-1]["eval/loss"])  # the factory's "val" set


def test_the_lstm_language_model_trains_with_sgd_and_two_ranks_match_one(tmp_path):
    """examples/lstm_lm.py (configs/lstm_lm.yaml: a 2-layer character LSTM, plain SGD, clip 0.25) as the lm task:
    the loss falls, and over 2 DDP ranks every step's raw norm, clipped norm and loss are one process's (the
    norm taken after the all-reduce; the tied embedding's gradient summed over both of its uses)."""
    args = ("train", "-c", str(ROOT / "configs/lstm_lm.yaml"), "train.max_steps=30", "logging.every=1",
            "logging.wandb.mode=disabled", "train.checkpoint=false", f"data.text_file={ROOT / 'README.md'}")
    p = cli(*args, f"run.out_dir={tmp_path / 'one'}")
    assert p.returncode == 0, p.stderr
    q = torchrun_cli(*args, f"run.out_dir={tmp_path / 'two'}", nproc=2)
    assert q.returncode == 0, q.stderr
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(one) == len(two) == 30
    assert sum(r["train/loss"] for r in one[-5:]) / 5 < one[0]["train/loss"] - 0.5
    assert all(r["grad_norm/raw"] > 0.25 for r in one[:5])  # SGD's gradients here are clipped
    for a, b in zip(one, two):
        assert b["grad_norm/raw"] == pytest.approx(a["grad_norm/raw"], rel=1e-5)
        assert b["grad_norm/clipped"] == pytest.approx(a["grad_norm/clipped"], rel=1e-5)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
