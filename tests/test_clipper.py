"""dist_train.Clipper in a user's own loop: the true global norm under DDP and FSDP2, a NaN step skipped with no
host read and nothing touched, the fp16 scale lowered, bad use refused; each with the mistake it catches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_train import Clipper, ClipStats
from dist_train.errors import ConfigError, UsageError
from tests.dist_utils import spawn

STEPS, BATCH, MAX_NORM = 4, 16, 0.3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _reference() -> tuple[list[tuple[float, float]], list[torch.Tensor]]:
    """One process, the whole batch, clip_grad_norm_ and the same fused AdamW."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    out = []
    for step in range(STEPS):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        raw = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        out.append((raw, raw * min(1.0, MAX_NORM / (raw + 1e-6))))
        opt.step()
        opt.zero_grad()
    return out, [p.detach().clone() for p in model.parameters()]


def _user_loop(kind: str) -> dict:
    """A user's torchrun loop on each rank: DDP or fully_shard, their half of each batch, Clipper.step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = _model()
        if kind == "ddp":
            model = DDP(model)
        elif kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        clipper = Clipper("fixed", max_norm=MAX_NORM)
        rows, types, local = [], set(), []
        for step in range(STEPS):
            x, y = _batch(step)
            part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            F.cross_entropy(model(x[part]), y[part]).backward()
            if kind == "fsdp":  # the negative control: the norm of this rank's shards alone
                local.append(float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.to_local().norm() for p in model.parameters()]))))
            stats = clipper.step(model, opt)
            types.add(type(stats.grad_norm_raw).__name__)
            d = stats.to_dict()
            rows.append((d["grad_norm/raw"], d["grad_norm/clipped"]))
            opt.zero_grad(set_to_none=True)
        if kind == "fsdp":
            from dist_train.strategies.base import full

            params = [full(p.detach()).clone() for p in model.parameters()]
        else:
            params = [p.detach().clone() for p in model.parameters()]
        dist.barrier()  # leave together (gloo can abort a rank whose peer tears down first)
        return {"rows": rows, "params": params, "types": types, "local": local}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def loops():
    return {kind: spawn(_user_loop, 2, kind) for kind in ("ddp", "fsdp", "unsynced")}


def test_a_ddp_loop_gets_the_single_process_norm_and_weights(loops):
    want, params = _reference()
    for rank in loops["ddp"]:
        assert rank["types"] == {"Tensor"}
        for (raw, clipped), (w_raw, w_clipped) in zip(rank["rows"], want):
            assert raw == pytest.approx(w_raw, rel=1e-5) and clipped == pytest.approx(w_clipped, rel=1e-5)
        for a, b in zip(rank["params"], params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert want[0][1] < want[0][0]  # clipping is at work


def test_negative_control_one_ranks_norm_misses(loops):
    """A model without DDP: each rank's Clipper sees its own half-batch gradient, the norm a clipper gets when
    it clips before (or without) the all-reduce; it misses the global norm."""
    want, _ = _reference()
    for rank in loops["unsynced"]:
        assert abs(rank["rows"][0][0] - want[0][0]) > 1e-3 * want[0][0]


def test_an_fsdp2_loop_gets_a_plain_tensor_equal_on_every_rank(loops):
    want, params = _reference()
    r0, r1 = loops["fsdp"]
    assert r0["types"] == {"Tensor"}  # not a DTensor
    assert r0["rows"] == r1["rows"]  # the same norm on every rank
    for (raw, _), (w_raw, _) in zip(r0["rows"], want):
        # The norm over shards, each taken in fp32 (see tests/test_tasks.py): these tensors are small.
        assert raw == pytest.approx(w_raw, rel=1e-5)
    assert abs(r0["local"][0] - want[0][0]) > 1e-3 * want[0][0]  # negative control: the local shards' norm


# ---- one process ---------------------------------------------------------------------------------------
def _state(model, opt, clipper):
    return ([p.detach().clone() for p in model.parameters()],
            {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items()},
            copy.deepcopy(clipper.state_dict()))


def _same(a, b) -> bool:
    params_a, opt_a, clip_a = a
    params_b, opt_b, clip_b = b
    same_tensors = all(torch.equal(x, y) for x, y in zip(params_a, params_b)) and all(
        torch.equal(opt_a[k], opt_b[k]) for k in opt_a)

    def flat(d):
        return [v for v in (d.values() if isinstance(d, dict) else [d]) for v in (flat(v) if isinstance(v, dict) else [v])]

    same_clip = all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                    for x, y in zip(flat(clip_a), flat(clip_b)))
    return same_tensors and same_clip


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_a_planted_nan_is_skipped_without_a_host_read_and_touches_nothing(fp16):
    from tests.test_fused_step import SyncCounter

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clipper = Clipper("zscore", max_norm=MAX_NORM, warmup_steps=2, skip_sigma=6, skip_window=4, skip_min_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if fp16 else None
    counter = SyncCounter()
    for step in range(6):
        x, y = _batch(step)
        if step == 4:
            x = x * float("nan")
        loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        before = _state(model, opt, clipper)
        scale = scaler.get_scale() if scaler else None
        with counter:
            stats = clipper.step(model, opt, scaler=scaler)
        opt.zero_grad(set_to_none=True)
        if step == 4:
            assert isinstance(stats, ClipStats) and stats.to_dict()["optim/step_skipped"] == 1
            assert _same(before, _state(model, opt, clipper))
            if scaler:
                assert scaler.get_scale() < scale  # lowered after the overflow
        else:
            assert stats.to_dict()["optim/step_skipped"] == 0 and not _same(before, _state(model, opt, clipper))
    assert sum(counter.by_step.values()) == 0, counter.by_step


def test_the_explicit_path_is_one_read_and_the_same_numbers():
    """A non-fused optimizer (torch's single-tensor SGD, which reads nothing itself): clip_grad_norm_'s norm, one
    host read per step, whether to step (the negative control of the counter above: it does see reads)."""
    from tests.test_fused_step import SyncCounter

    model = _model()
    slow = torch.optim.SGD(model.parameters(), lr=1e-2, foreach=False)
    clipper, counter = Clipper("fixed", max_norm=MAX_NORM), SyncCounter()
    for step in range(STEPS):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        want = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        with counter:
            stats = clipper.step(model, slow)
        slow.zero_grad()
        assert stats.to_dict()["grad_norm/raw"] == want
    assert counter.by_step[0] == STEPS


def test_bad_use_is_one_clear_error():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with pytest.raises(UsageError, match="no trainable parameter of the model has a gradient: call loss.backward"):
        Clipper().step(model, opt)
    with pytest.raises(UsageError, match="model must be a torch.nn.Module .*got AdamW"):
        Clipper().step(opt, model)
    with pytest.raises(UsageError, match="pass the optimizer"):
        Clipper().step(model)
    with pytest.raises(ConfigError, match="option 'max_norm' takes float, got str '1.0'"):
        Clipper("fixed", max_norm="1.0")
    frozen = _model().requires_grad_(False)
    with pytest.raises(UsageError, match="no trainable parameter"):
        Clipper().step(frozen, opt)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    other = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    with pytest.raises(UsageError, match="the optimizer holds none of the model's parameters"):
        Clipper().step(model, other)
    with pytest.raises(UsageError, match="the GradScaler has not scaled a loss yet"):
        Clipper().step(model, opt, scaler=torch.amp.GradScaler("cpu"))
    model.zero_grad(set_to_none=True)
    with pytest.raises(ConfigError, match="unknown option 'max_nrom'; did you mean 'max_norm'"):
        Clipper("fixed", max_nrom=1.0)
    with pytest.raises(ConfigError, match="option 'max_norm': must be finite and > 0"):
        Clipper("fixed", max_norm=-1.0)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batch(0)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(ConfigError, match="unscale_\\(optimizer\\) was already called"):
        Clipper().step(model, opt, scaler=scaler)


def test_state_dict_restores_the_policy_and_the_spike_window():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    options = dict(max_norm=MAX_NORM, warmup_steps=2, skip_sigma=6, skip_window=4, skip_min_steps=2)
    a = Clipper("zscore", **options)
    for step in range(4):
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        a.step(model, opt)
        opt.zero_grad()
    b = Clipper("zscore", **options)
    with pytest.warns(UserWarning, match="the saved policy is zscore and this one percentile: it starts afresh"):
        Clipper("percentile").load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict())
    x, y = _batch(9)
    F.cross_entropy(model(x), y).backward()
    ta = a.policy.next_threshold(torch.device("cpu"))
    tb = b.policy.next_threshold(torch.device("cpu"))
    assert torch.equal(ta, tb) and torch.equal(a.skip.limits(), b.skip.limits())


def _accelerate_loop() -> dict:
    """One process, no launcher (in a process of its own: Accelerate's state is a process-wide singleton)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    from tests.test_fused_step import SyncCounter

    acc = Accelerator(cpu=True)
    model = _model()
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
    clipper, counter = Clipper("fixed", max_norm=MAX_NORM), SyncCounter()
    raws = []
    for step in range(STEPS):
        x, y = _batch(step)
        acc.backward(F.cross_entropy(model(x), y))
        with counter:
            stats = clipper.step(model, opt)
        opt.zero_grad()
        raws.append(stats.to_dict()["grad_norm/raw"])
    params = [p.detach().clone() for p in acc.unwrap_model(model).parameters()]
    windowed = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=2))
    m2 = _model()
    m2, o2 = windowed.prepare(m2, torch.optim.AdamW(m2.parameters(), lr=1e-2, fused=True))
    refused = ""
    with windowed.accumulate(m2):
        x, y = _batch(0)
        windowed.backward(F.cross_entropy(m2(x), y))
        try:
            clipper.step(m2, o2)
        except ConfigError as e:
            refused = str(e)
    return {"raws": raws, "params": params, "reads": sum(counter.by_step.values()), "refused": refused}


def test_objects_accelerate_prepared_are_unwrapped_and_nothing_is_read_back():
    """The prepared optimizer's fused AdamW takes the clip coefficient: no host read, the single-process norms and
    weights; inside an accumulation window the step is refused."""
    want, params = _reference()
    (r,) = spawn(_accelerate_loop, 1)
    assert r["reads"] == 0
    for raw, (w_raw, _) in zip(r["raws"], want):
        assert raw == pytest.approx(w_raw, rel=1e-6)
    for a, b in zip(r["params"], params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert "inside Accelerate's gradient accumulation window" in r["refused"]


def _deepspeed_loop() -> dict:
    """A user's DeepSpeed loop on each rank: ZeRO-2 in fp32, `clipper.step(engine)` in place of `engine.step()`."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)

    def engine(clipping: float = 0.0, accum: int = 1):
        model = _model()
        config = {"train_batch_size": BATCH, "gradient_accumulation_steps": accum,
                  "train_micro_batch_size_per_gpu": BATCH // (world * accum), "zero_optimization": {"stage": 2},
                  "gradient_clipping": clipping}
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                            config=config)
        return eng

    def delta(eng, before) -> float:
        return float(torch.linalg.vector_norm(torch.stack(
            [(p.detach() - b).norm() for p, b in zip(eng.module.parameters(), before)])))

    def refused(clipper, eng, *args) -> str:
        try:
            clipper.step(eng, *args)
        except UsageError as e:  # ConfigError is one
            return str(e)
        return ""

    try:
        eng, clipper, rows = engine(), Clipper("fixed", max_norm=MAX_NORM), []
        for step in range(STEPS):
            x, y = _batch(step)
            eng.backward(F.cross_entropy(eng(x[part]), y[part]))
            d = (clipper.step(eng, eng.optimizer) if step % 2 else clipper.step(eng)).to_dict()  # both forms
            rows.append((d["grad_norm/raw"], d["grad_norm/clipped"]))
        from deepspeed.utils import safe_get_full_fp32_param

        params = [safe_get_full_fp32_param(p).clone() for p in eng.module.parameters()]
        # The threshold reaches the engine: 1e-9 against the engine's own unclipped step (gradient_clipping 0);
        # a two-micro-batch window, in which a Clipper step before the boundary is refused.
        x, y = _batch(0)
        updates, window = {}, ""
        for name, clip in (("tiny", Clipper("fixed", max_norm=1e-9)), ("unclipped", None)):
            eng = engine(accum=2)
            before = [p.detach().clone() for p in eng.module.parameters()]
            for i, half in enumerate(torch.arange(BATCH)[part].chunk(2)):
                eng.backward(F.cross_entropy(eng(x[half]), y[half]))
                if i == 0:
                    if clip is not None:
                        window = refused(clip, eng)
                    eng.step()
            clip.step(eng) if clip is not None else eng.step()
            updates[name] = delta(eng, before)
        wrong = {p: refused(Clipper(p, **kw), eng) for p, kw in (("agc", {}), ("fixed", {"skip_sigma": 4.0}))}
        wrong["optimizer"] = refused(Clipper(), eng, torch.optim.SGD(_model().parameters(), lr=0.1))
        wrong["scaler"] = refused(Clipper(), eng, None, torch.amp.GradScaler("cpu"))
        dist.barrier()
        return {"rows": rows, "params": params, "updates": updates, "window": window, "wrong": wrong}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def deepspeed_loop():
    pytest.importorskip("deepspeed")
    return spawn(_deepspeed_loop, 2, timeout=600)


def test_a_deepspeed_loop_gets_the_engines_true_norm_and_the_single_process_weights(deepspeed_loop):
    """clipper.step(engine) under ZeRO-2: the engine's norm over the partitions is the whole batch's norm on one
    process, the threshold the engine applied is the Clipper's (clipped = min(raw, MAX_NORM)), and the weights
    are clip_grad_norm_'s single-process ones."""
    want, params = _reference()
    for rank in deepspeed_loop:
        for (raw, clipped), (w_raw, w_clipped) in zip(rank["rows"], want):
            assert raw == pytest.approx(w_raw, rel=1e-5)
            assert clipped == pytest.approx(w_clipped, rel=1e-5)
        for a, b in zip(rank["params"], params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(w_raw > MAX_NORM for w_raw, _ in want)  # the threshold acted on some step


def test_a_tiny_threshold_reaches_the_engine_and_misuse_is_refused(deepspeed_loop):
    """max_norm=1e-9 shrinks AdamW's first update (g / (|g| + eps) with |g| far below eps) against the engine's
    own unclipped step: the mistake it catches is a threshold never handed to the engine."""
    for rank in deepspeed_loop:
        assert rank["updates"]["tiny"] < 0.2 * rank["updates"]["unclipped"], rank["updates"]
        assert "inside DeepSpeed's gradient accumulation window" in rank["window"]
        assert "'agc' needs per-parameter gradients" in rank["wrong"]["agc"]
        assert "option 'skip_sigma'" in rank["wrong"]["fixed"]
        assert "this optimizer is not the engine's" in rank["wrong"]["optimizer"]
        assert "do not pass a GradScaler" in rank["wrong"]["scaler"]


def _accelerate_fp16(skip_unscale: bool) -> dict:
    """One process, Accelerate in fp16 on the CPU (torch's CPU GradScaler, as Accelerate makes on a GPU): the
    Clipper's first raw norm against the unscaled norm of the same fp16 forward computed here. `skip_unscale`:
    the negative control, a Clipper that takes the norm before the unscale."""
    import copy as _copy

    from accelerate import Accelerator

    import dist_train.step

    if skip_unscale:
        dist_train.step.unscaled_norm = lambda norm, scale: norm
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu")  # Accelerate 1.x turns fp16 off on a CPU
    model = _model()
    twin = _copy.deepcopy(model)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
    x, y = _batch(0)
    acc.backward(F.cross_entropy(model(x), y))
    stats = Clipper("fixed", max_norm=MAX_NORM).step(model, opt)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(twin(x), y)
    loss.float().backward()
    want = float(torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]))
    return {"raw": stats.to_dict()["grad_norm/raw"], "scale": stats.to_dict()["amp/loss_scale"], "want": want}


def test_accelerate_fp16_logs_and_clips_the_unscaled_norm():
    """The norm of Accelerate's fp16 gradients is the unscaled one (GradScaler's scale is a power of two, so
    equal up to fp16 rounding of the scaled backward); a Clipper that skips the unscale reports scale x that."""
    (good,), (bad,) = spawn(_accelerate_fp16, 1, False), spawn(_accelerate_fp16, 1, True)
    assert good["scale"] == 65536.0  # fp16 was really on
    assert good["raw"] == pytest.approx(good["want"], rel=1e-3)
    assert bad["raw"] != pytest.approx(bad["want"], rel=1e-3)  # the negative control fails the same check
    assert bad["raw"] == pytest.approx(good["raw"] * 65536.0, rel=1e-3)


def _first_norm(fp16: bool = False) -> float:
    """The examples' first step on one process: the whole batch's gradient norm (fp16: under CPU autocast)."""
    import contextlib
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "examples"))
    from own_loop_ddp import batch, model

    net = model()
    x, y = batch(1)
    with torch.autocast("cpu", dtype=torch.float16) if fp16 else contextlib.nullcontext():
        loss = F.cross_entropy(net(x), y)
    loss.float().backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]))


DOC = "docs/clipper.md"


def doc_commands() -> list[str]:
    import re

    from tests.conftest import ROOT

    text = (ROOT / DOC).read_text(encoding="utf-8")
    return [line for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
            for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def doc_runs():
    """docs/clipper.md's commands, verbatim, each under its launcher (torchrun, accelerate launch, DeepSpeed's
    launcher): the JSON lines rank 0 printed, by the example and its flags."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    from tests import forkserver
    from tests.conftest import SHIMS

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "MASTER_",
                                                                       "ACCELERATE_", "LOCAL_RANK"))}
    # torchrun, accelerate and deepspeed are the shims in tests/bin: each launcher's own code, forked warm by the
    # test server with the workers it starts (fresh launches of each are in test_distributed, test_strategies
    # and test_deepspeed).
    forkserver.ForkServer.get()
    env.update(PYTHONPATH=str(ROOT), PATH=f"{SHIMS}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
               f"{env.get('PATH', '')}", DIST_TRAIN_TEST_FORKSERVER=os.environ[forkserver.SOCKET_ENV])
    out = {}
    for line in doc_commands():
        p = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{DOC}: {line}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        words = line.split()
        example = next(w for w in words if w.startswith("examples/"))
        flags = [w for w in words[words.index(example) + 1:] if w in ("--fsdp", "--fp16")]
        key = example.split("/")[1].removesuffix(".py").removeprefix("own_loop_") + "".join(flags)
        out[key] = [json.loads(r) for r in p.stdout.splitlines() if r.startswith("{")]
    return out


def test_the_docs_run_every_launcher():
    assert {c.split("examples/")[1].split()[0] for c in doc_commands()} == \
        {"own_loop_ddp.py", "own_loop_accelerate.py", "own_loop_deepspeed.py"}
    assert any(c.startswith("deepspeed ") for c in doc_commands())
    assert any("accelerate launch" in c and "--mixed_precision fp16" in c for c in doc_commands())


def test_the_docs_python_excerpts_are_the_examples_code():
    """Each Python block of docs/clipper.md past the first (the generic loop) is the example's own lines, in order:
    what the page shows is what the tests launch."""
    import re

    from tests.conftest import ROOT

    text = (ROOT / DOC).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)[1:]
    examples = {p.name: [line.strip() for line in p.read_text().splitlines()] for p in (ROOT / "examples").glob("own_loop_*.py")}
    assert len(blocks) == 3
    for block in blocks:
        lines = [line.strip() for line in block.splitlines() if line.strip()]

        def contains(src: list[str]) -> bool:
            it = iter(src)
            return all(any(line == s for s in it) for line in lines)

        assert any(contains(src) for src in examples.values()), block


def test_the_own_loop_example_runs_under_torchrun(doc_runs):
    """The example's first raw norm is the whole batch's gradient norm on one process (computed here), its DDP
    and FSDP2 runs agree step by step, and with --fp16 the norm is the unscaled one."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT))
    from examples.own_loop_ddp import batch, model

    ddp, fsdp = doc_runs["ddp"], doc_runs["ddp--fsdp"]
    assert [r["step"] for r in ddp] == list(range(1, 9)) == [r["step"] for r in fsdp]
    net = model()
    x, y = batch(1)
    F.cross_entropy(net(x), y).backward()
    want = float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]))
    assert ddp[0]["grad_norm/raw"] == pytest.approx(want, rel=1e-5)
    for a, b in zip(ddp, fsdp):
        assert a["grad_norm/raw"] == pytest.approx(b["grad_norm/raw"], rel=1e-5)
        assert a["grad_norm/clipped"] == pytest.approx(b["grad_norm/clipped"], rel=1e-5)
    fp16 = doc_runs["ddp--fp16"]  # GradScaler: the unscaled norm, and fp16 was really on
    assert fp16[0]["amp/loss_scale"] == 65536.0 and "amp/loss_scale" not in ddp[0]
    assert fp16[0]["grad_norm/raw"] == pytest.approx(_first_norm(fp16=True), rel=2e-3)




def test_the_accelerate_example_runs_under_accelerate_launch_in_fp16(doc_runs):
    """examples/own_loop_accelerate.py, 2 CPU processes, fp16, 2 micro-batches a step: the first raw norm is the
    whole batch's unscaled one, and the loss scale shows fp16 was on."""
    rows = doc_runs["accelerate"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["amp/loss_scale"] == 65536.0
    assert rows[0]["grad_norm/raw"] == pytest.approx(_first_norm(fp16=True), rel=2e-3)
    assert all(r["optim/step_skipped"] == 0 for r in rows)


def test_the_deepspeed_example_runs_under_deepspeeds_launcher(doc_runs):
    """examples/own_loop_deepspeed.py through `deepspeed`, 2 processes, ZeRO-2 with 2 micro-batches a step: the
    engine's first norm is the whole batch's gradient norm on one process."""
    rows = doc_runs["deepspeed"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["grad_norm/raw"] == pytest.approx(_first_norm(), rel=1e-5)
    assert rows[0]["grad_norm/threshold"] == 1.0 and all(r["optim/step_skipped"] == 0 for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_a_cuda_loop_never_syncs_inside_clipper_step(fp16):
    """A user's CUDA loop with fused AdamW, zscore and spike skipping: clipper.step runs under
    torch.cuda.set_sync_debug_mode("error") (any host sync raises), and a planted NaN is skipped."""
    dev = torch.device("cuda")
    model = _model().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    clipper = Clipper("zscore", max_norm=MAX_NORM, warmup_steps=2, skip_sigma=3.0, skip_min_steps=2, skip_window=8)
    rows = []
    for step in range(8):
        x, y = (t.to(dev) for t in _batch(step))
        if step == 5:
            x[0, 0] = float("nan")
        with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats = clipper.step(model, opt, scaler)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rows.append(stats.to_dict())
        opt.zero_grad(set_to_none=True)
    assert [r["optim/step_skipped"] for r in rows] == [0] * 5 + [1] + [0] * 2
    assert all(r["grad_norm/raw"] is not None for i, r in enumerate(rows) if i != 5)
