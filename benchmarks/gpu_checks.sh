#!/usr/bin/env bash
# The checks that need a GPU, in one go (nothing in CI depends on them):
#   - the host-sync-free step under torch.cuda.set_sync_debug_mode("error"), and the fused-step tests, on CUDA;
#   - the whole-step and norm+clip benchmarks on the GPU (the step also with the article's CNN and SGD);
#   - the article's CNN (task classify, SGD) through the CLI: one process in fp32 and bf16, FSDP2 and
#     DeepSpeed ZeRO-2 in bf16; the fused-step tests include it and SGD under set_sync_debug_mode("error");
#   - short training runs (12 steps, every step logged) through the real CLI and launch scripts: one process
#     in fp32, bf16 and fp16; torchrun; FSDP2 in bf16 and fp16; DeepSpeed ZeRO 0-3 in fp32, bf16 and fp16
#     (DeepSpeed's launcher and torchrun); accelerate launch in fp16 and bf16, with its FSDP2 and with
#     DeepSpeed; each run's metrics.jsonl is then checked: every step logged, finite raw norms, clipped <=
#     threshold, the loss going down, fp16's loss scale logged, and the first raw norm against the fp32 run's
#     (the same within 1e-4/1e-3 in fp32; within a factor 2 in bf16/fp16, and not bit-identical to fp32);
#   - the Clipper in users' own CUDA loops: no host sync inside clipper.step under set_sync_debug_mode("error")
#     (fp32 and fp16 with a GradScaler, a planted NaN skipped), and the own-loop examples under torchrun (DDP,
#     FSDP2, fp16 with NCCL), accelerate launch (fp16) and DeepSpeed's launcher (ZeRO-2, 2 micro-batches);
#   - with 2 or more GPUs also DDP training and `dist-train verify` (DDP, FSDP2, ZeRO-2); N/A on one GPU
#     (verify needs 2 ranks, and each rank binds cuda:LOCAL_RANK).
# Run from the repository root with a CUDA build of torch (python3, or PYTHON=...); the package need not be
# installed (PYTHONPATH gets the repository). Packages that machine lacks can travel as wheels in .whl/: the
# ones missing there (or too old for what needs them) are installed into /tmp/site first, nothing else.
#   bash benchmarks/gpu_checks.sh            (quote the GPU's name with the figures)
# Every check runs even when an earlier one failed; each ends with "=== CHECK name: PASS|FAIL (rc) [Ns] ===",
# the summary comes last, and the exit code is non-zero if any check failed or was skipped for time.
# The run directories and logs go to /tmp/gpu; the combined log, the summary and a tarball of the logs and
# metrics go to $OUT (default /tmp/gpu_out).
# Knobs (environment): PYTHON (python3), GPU_CHECKS_ONLY (an extended regex of check names to run),
# GPU_CHECKS_JOBS (training checks run side by side, default 5; the benchmarks always run alone),
# GPU_CHECKS_DEADLINE_S (no check runs past this many seconds from the start, default 450),
# GPU_CHECKS_DEVICE (cuda; cpu turns the training checks into a CPU smoke test of this script).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHON="$PY"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK=/tmp/gpu
OUTDIR="${OUT:-/tmp/gpu_out}"
ONLY="${GPU_CHECKS_ONLY:-}"
JOBS="${GPU_CHECKS_JOBS:-5}"
DEADLINE="${GPU_CHECKS_DEADLINE_S:-450}"
DEVICE="${GPU_CHECKS_DEVICE:-cuda}"
STEPS=12
if [[ "$DEVICE" == cuda ]]; then BACKEND=nccl; else BACKEND=gloo; fi

rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/res" "$WORK/runs" "$OUTDIR" || exit 1
: > "$OUTDIR/summary.txt"

# ---- the wheels in .whl/: only what this machine lacks --------------------------------------------------
install_wheels() {
  local site=/tmp/site
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no .whl/ wheels: using the packages installed"
    return 0
  fi
  rm -rf "$site"
  local picked
  # dist_train's requirements (pyproject.toml, with the dev extra), resolved against what is installed here:
  # a requirement the machine meets is left alone; otherwise the wheel from .whl/ is taken, and its own
  # requirements in turn. Prints the wheels to install, one a line.
  picked=$("$PY" - .whl <<'PY'
import importlib.metadata as md, os, sys, zipfile
from email.parser import Parser
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

def say(*a):
    print("wheels:", *a, file=sys.stderr)

roots = ["torch>=2.6", "numpy>=1.24", "omegaconf>=2.3", "wandb>=0.19", "tqdm>=4.66", "matplotlib>=3.8", "pytest>=8",
         "accelerate>=1.10,<2", "deepspeed>=0.19.8,<0.20", "transformers>=4.46"]
try:
    import tomllib
    with open("pyproject.toml", "rb") as f:
        proj = tomllib.load(f)["project"]
    roots = proj["dependencies"] + proj.get("optional-dependencies", {}).get("dev", [])
except Exception as e:
    say(f"pyproject.toml not read ({e}); using the built-in list")

wheels = {}
for f in sorted(os.listdir(sys.argv[1])):
    if f.endswith(".whl"):
        path = os.path.join(sys.argv[1], f)
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            msg = Parser().parsestr(z.read(meta).decode("utf-8"))
        wheels[canonicalize_name(msg["Name"])] = (path, Version(msg["Version"]), msg.get_all("Requires-Dist") or [])
installed = {}
for d in md.distributions():
    try:
        name = d.metadata["Name"]
        if name:
            installed.setdefault(canonicalize_name(name), Version(d.version))
    except Exception:
        pass

specs, chosen, extras_of, problems = {}, {}, {}, {}

def satisfied(name, version):
    return all(s.contains(version, prereleases=True) for s, _ in specs[name])

def take(name, extras):
    first = name not in chosen
    new = set(extras) - extras_of.get(name, set())
    if not first and not new:
        return
    chosen[name] = wheels[name][0]
    extras_of.setdefault(name, set()).update(new)
    for line in wheels[name][2]:
        r = Requirement(line)
        base = r.marker is None or r.marker.evaluate({"extra": ""})
        via_new = r.marker is not None and any(r.marker.evaluate({"extra": e}) for e in new)
        if (first and (base or via_new)) or (not first and via_new and not base):
            want(line, name)

def want(line, origin):
    r = Requirement(line)
    name = canonicalize_name(r.name)
    specs.setdefault(name, []).append((r.specifier, origin))
    if name in chosen:
        if not satisfied(name, wheels[name][1]):
            problems[name] = f"{name}: {wheels[name][1]} from .whl/ does not meet {r.specifier} ({origin})"
        take(name, r.extras)
        return
    have = installed.get(name)
    if have is not None and satisfied(name, have):
        return  # the machine's own
    if name in wheels and satisfied(name, wheels[name][1]):
        take(name, r.extras)
    else:
        need = ", ".join(f"{s or 'any'} ({o})" for s, o in specs[name])
        problems[name] = (f"{name}: needs {need}; installed: {have or 'none'}; .whl/: "
                          f"{wheels[name][1] if name in wheels else 'none'}")

for line in roots:
    want(line, "dist_train")
for name in sorted(problems):
    say("WARNING", problems[name])
kept = sorted(set(wheels) - set(chosen))
say(f"installing {len(chosen)}: {' '.join(sorted(chosen)) or '-'}")
say(f"not needed here (installed already): {' '.join(kept) or '-'}")
for name in sorted(chosen):
    print(chosen[name])
PY
) || { echo "wheels: could not work out which wheels to install; installing none"; picked=""; }
  if [[ -n "$picked" ]]; then
    local -a files
    mapfile -t files <<< "$picked"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${files[@]}"; then
      echo "wheels: pip install failed; unpacking the wheels into $site instead"
      "$PY" - "$site" "${files[@]}" <<'PY' || echo "wheels: unpacking failed too"
import os, shutil, sys, zipfile
site = sys.argv[1]
for path in sys.argv[2:]:
    with zipfile.ZipFile(path) as z:
        z.extractall(site)
for entry in os.listdir(site):
    if entry.endswith(".data"):
        for part in ("purelib", "platlib", "scripts"):
            src = os.path.join(site, entry, part)
            if os.path.isdir(src):
                dst = os.path.join(site, "bin") if part == "scripts" else site
                shutil.copytree(src, dst, dirs_exist_ok=True)
        shutil.rmtree(os.path.join(site, entry))
PY
    fi
    export PYTHONPATH="$site:$PYTHONPATH"
    export PATH="$site/bin:$PATH"
  fi
}

# ---- running and reporting checks ------------------------------------------------------------------------
declare -a ORDER=()
LOCK="$WORK/print.lock"

selected() { [[ -z "$ONLY" || "$1" =~ $ONLY ]]; }

report() {  # NAME STATUS RC SECONDS [NOTE]: the tail of the check's log and its CHECK line, and a summary line
  local name=$1 status=$2 rc=$3 secs=$4 note=${5:-} log="$WORK/logs/$1.log" lines=30
  [[ "$status" == PASS ]] || lines=80
  [[ "$name" == bench-* ]] && lines=200
  echo "$status $rc $secs $note" > "$WORK/res/$name"
  {
    if [[ -f "$log" ]]; then
      echo "----- $name (last $lines lines of $log) -----"
      tail -n "$lines" "$log"
    fi
    echo "=== CHECK $name: $status ($rc) [${secs}s]${note:+ $note} ==="
  } > "$WORK/res/$name.out"
  # One check's report at a time (the pool's checks finish side by side).
  {
    command -v flock >/dev/null 2>&1 && flock 9
    cat "$WORK/res/$name.out"
    echo "$name $status ($rc) ${secs}s $note" >> "$OUTDIR/summary.txt"
  } 9>> "$LOCK"
}

# run_check NAME TIMEOUT_S METRICS CMD...: runs CMD (under `timeout`), then, when it succeeded and METRICS is
# not "-", the metrics check with the arguments in METRICS (a run directory first).
run_check() {
  local name=$1 limit=$2 metrics=$3 start=$SECONDS rc left
  shift 3
  left=$(( DEADLINE - SECONDS ))
  if (( left < 20 )); then
    report "$name" SKIP - 0 "(time: past GPU_CHECKS_DEADLINE_S=$DEADLINE)"
    return 0
  fi
  (( limit > left )) && limit=$left
  (
    echo "\$ $*"
    timeout -k 15 "$limit" "$@"
    rc=$?
    (( rc == 124 || rc == 137 )) && echo "check $name: timed out after ${limit}s"
    if (( rc == 0 )) && [[ "$metrics" != - ]]; then
      # shellcheck disable=SC2086
      "$PY" "$WORK/metrics_check.py" $metrics
      rc=$?
    fi
    exit "$rc"
  ) > "$WORK/logs/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then report "$name" PASS 0 $(( SECONDS - start )); else report "$name" FAIL "$rc" $(( SECONDS - start )); fi
}

check() {  # in the foreground, alone: check NAME TIMEOUT_S METRICS CMD...
  selected "$1" || return 0
  ORDER+=("$1")
  run_check "$@"
}

pool() {  # side by side with the other pool checks (at most GPU_CHECKS_JOBS at once)
  selected "$1" || return 0
  ORDER+=("$1")
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  ( export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"; run_check "$@" ) &
}

not_applicable() {  # NAME REASON
  selected "$1" || return 0
  ORDER+=("$1")
  report "$1" N/A - 0 "($2)"
}

# ---- helper scripts: the imports and the metrics check ---------------------------------------------------
write_helpers() {
  cat > "$WORK/imports.py" <<'PY'
"""What the checks import, with versions and where from."""
import importlib, sys
import torch

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
bad = 0
for name in ("numpy", "omegaconf", "wandb", "tqdm", "matplotlib", "yaml", "pydantic", "accelerate", "transformers",
             "deepspeed", "dist_train"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')} from {mod.__file__}")
    except Exception as e:
        bad = 1
        print(f"  {name}: IMPORT FAILED: {type(e).__name__}: {e}")
sys.exit(bad)
PY
  cat > "$WORK/metrics_check.py" <<'PY'
"""Checks one run's metrics.jsonl; prints its first and last rows briefly; exit 1 on any problem."""
import argparse, json, math, os, sys

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--steps", type=int, required=True, help="every step 1..N must be logged")
p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], required=True)
p.add_argument("--ref", help="the fp32 run to compare the first raw norm with")
p.add_argument("--rtol", type=float, help="fp32 against fp32: relative tolerance of the first raw norm")
p.add_argument("--factor", type=float, default=2.0, help="bf16/fp16: the first raw norm within this factor")
a = p.parse_args()


def load(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fin(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def brief(r):
    keys = [("step", "step"), ("train/loss", "loss"), ("grad_norm/raw", "raw"), ("grad_norm/clipped", "clipped"),
            ("grad_norm/threshold", "threshold"), ("amp/loss_scale", "loss_scale"), ("optim/skipped_steps", "skipped")]
    return " ".join(f"{label}={r[k]:.6g}" if fin(r.get(k)) else f"{label}={r.get(k)}" for k, label in keys if k in r)


errors = []
rows = load(a.run_dir)
if not rows:
    sys.exit(f"metrics check: {a.run_dir}/metrics.jsonl has no rows")
steps = [r.get("step") for r in rows]
if steps != list(range(1, a.steps + 1)):
    errors.append(f"logged steps are {steps}, expected 1..{a.steps}")
good = [r for r in rows if not r.get("optim/step_skipped")]
skipped = [r.get("step") for r in rows if r.get("optim/step_skipped")]
if len(skipped) > a.steps // 2:
    errors.append(f"{len(skipped)} of {len(rows)} steps skipped: {skipped}")
for r in rows:
    s, raw, clipped, thr = r.get("step"), r.get("grad_norm/raw"), r.get("grad_norm/clipped"), r.get("grad_norm/threshold")
    if r.get("optim/step_skipped"):
        if raw is not None:
            errors.append(f"step {s}: skipped, yet its raw norm is {raw} (a skipped step logs null)")
        continue
    if not fin(r.get("train/loss")):
        errors.append(f"step {s}: loss {r.get('train/loss')}")
    if not (fin(raw) and raw > 0):
        errors.append(f"step {s}: raw norm {raw} (finite and > 0 expected)")
        continue
    if fin(thr):
        if not fin(clipped) or clipped > thr * (1 + 1e-5):
            errors.append(f"step {s}: clipped norm {clipped} above the threshold {thr}")
        elif abs(clipped - min(raw, thr)) > 1e-4 * max(min(raw, thr), 1e-12):
            errors.append(f"step {s}: clipped norm {clipped} is not min(raw, threshold) = {min(raw, thr)}")
    if a.precision == "fp16" and not (fin(r.get("amp/loss_scale")) and r["amp/loss_scale"] >= 1):
        errors.append(f"step {s}: fp16 without a loss scale (amp/loss_scale = {r.get('amp/loss_scale')})")
print(f"metrics check {a.run_dir}: {len(rows)} rows, {len(skipped)} skipped{' ' + str(skipped) if skipped else ''}")
print(f"  first: {brief(rows[0])}")
print(f"  last:  {brief(rows[-1])}")
if len(good) >= 2 and all(fin(r.get("train/loss")) for r in (good[0], good[-1])):
    if not good[-1]["train/loss"] < good[0]["train/loss"]:
        errors.append(f"the loss did not go down: {good[0]['train/loss']:.6g} at step {good[0]['step']}, "
                      f"{good[-1]['train/loss']:.6g} at step {good[-1]['step']}")
if a.ref:
    try:
        ref = {r.get("step"): r for r in load(a.ref)}
    except OSError as e:
        ref = None
        print(f"  no reference run ({e}); the comparison is left out")
    if ref is not None:
        both = [r for r in good if fin(r.get("grad_norm/raw")) and fin(ref.get(r.get("step"), {}).get("grad_norm/raw"))]
        if not both:
            errors.append("no step with a finite raw norm in both this run and the reference")
        else:
            r = both[0]
            q = ref[r["step"]]
            x, y = r["grad_norm/raw"], q["grad_norm/raw"]
            ratio = x / y
            print(f"  step {r['step']}: raw {x:.8g} vs fp32 reference {y:.8g} (ratio {ratio:.6f}, rel diff "
                  f"{abs(ratio - 1):.2e}); loss {r.get('train/loss')} vs {q.get('train/loss')}")
            if a.rtol is not None:
                if abs(ratio - 1) > a.rtol:
                    errors.append(f"raw norm at step {r['step']} differs from the fp32 reference by "
                                  f"{abs(ratio - 1):.3g} relative (> {a.rtol:g})")
            elif not (1 / a.factor <= ratio <= a.factor):
                errors.append(f"raw norm at step {r['step']} is {ratio:.4g} times the fp32 reference's "
                              f"(outside 1/{a.factor:g}..{a.factor:g}: a loss scale left in, or not divided out?)")
            if a.precision != "fp32" and x == y and r.get("train/loss") == q.get("train/loss"):
                errors.append(f"{a.precision} run bit-identical to fp32 at step {r['step']}: was the precision applied?")
for e in errors:
    print(f"  ERROR: {e}")
print(f"metrics check: {'FAIL' if errors else 'PASS'}")
sys.exit(1 if errors else 0)
PY
}

# ---- the checks ------------------------------------------------------------------------------------------
main() {
  echo "gpu_checks: $(date -u +%FT%TZ) in $ROOT; python $PY; device $DEVICE; deadline ${DEADLINE}s; jobs $JOBS"
  local t0=$SECONDS
  install_wheels
  echo "wheels: done in $(( SECONDS - t0 ))s; PYTHONPATH=$PYTHONPATH"
  write_helpers
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee -a "$OUTDIR/summary.txt"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  local ngpu
  ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null | tail -n 1)
  [[ "$ngpu" =~ ^[0-9]+$ ]] || ngpu=0
  echo "GPUs visible to torch: $ngpu"

  check imports 120 - "$PY" "$WORK/imports.py"

  # -- alone on the GPU: the existing benchmarks --
  check bench-step 150 - "$PY" benchmarks/bench_step.py --device cuda --steps 50 --rounds 10
  check bench-clip 150 - "$PY" benchmarks/bench_clip.py --device cuda --steps 10 --rounds 10
  check bench-startup 150 - "$PY" benchmarks/bench_startup.py --device cuda --rounds 3
  check bench-step-cnn 150 - "$PY" benchmarks/bench_step.py --device cuda --model cnn --steps 50 --rounds 10

  local R="$WORK/runs" FP32="$WORK/runs/single-fp32"
  local -a C=("train.max_steps=$STEPS" "logging.every=1" "optim.warmup_steps=2" "logging.wandb.mode=disabled"
              "logging.progress=plain" "train.device=$DEVICE")
  local M="--steps $STEPS"
  # -- the fp32 reference first (the others compare their first raw norm with it) --
  check single-fp32 150 "$FP32 $M --precision fp32" \
    env DEVICE="$DEVICE" launch/debug.sh train.precision=no "run.out_dir=$FP32" "${C[@]}"

  # -- side by side --
  pool pytest-fused-step 300 - "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_step.py \
    -k "cuda or fused or folded or planted"
  local p j port=29610
  # DeepSpeed: ZeRO 0-3, DeepSpeed's launcher and torchrun, the shipped JSONs (precision from the JSON or
  # from train.precision).
  pool ds-zero1-bf16 200 "$R/ds-zero1-bf16 $M --precision bf16 --ref $FP32" \
    env NUM_PROCESSES=1 MASTER_PORT=$((port++)) DS_CONFIG=configs/deepspeed/zero1_bf16.json launch/deepspeed.sh \
    "run.out_dir=$R/ds-zero1-bf16" "${C[@]}"
  pool ds-zero1-fp16 200 "$R/ds-zero1-fp16 $M --precision fp16 --ref $FP32" \
    env NUM_PROCESSES=1 MASTER_PORT=$((port++)) DS_CONFIG=configs/deepspeed/zero1_fp16.json launch/deepspeed.sh \
    train.precision=fp16 "run.out_dir=$R/ds-zero1-fp16" "${C[@]}"
  pool ds-zero2-bf16-torchrun 200 "$R/ds-zero2-bf16-torchrun $M --precision bf16 --ref $FP32" \
    env LAUNCHER=torchrun NPROC_PER_NODE=1 DS_CONFIG=configs/deepspeed/zero2.json launch/deepspeed.sh \
    train.precision=bf16 "run.out_dir=$R/ds-zero2-bf16-torchrun" "${C[@]}"
  pool ds-zero2-fp16 200 "$R/ds-zero2-fp16 $M --precision fp16 --ref $FP32" \
    env NUM_PROCESSES=1 MASTER_PORT=$((port++)) DS_CONFIG=configs/deepspeed/zero2_fp16.json launch/deepspeed.sh \
    "run.out_dir=$R/ds-zero2-fp16" "${C[@]}"
  pool ds-zero3-bf16 200 "$R/ds-zero3-bf16 $M --precision bf16 --ref $FP32" \
    env NUM_PROCESSES=1 MASTER_PORT=$((port++)) DS_CONFIG=configs/deepspeed/zero3_bf16.json launch/deepspeed.sh \
    train.precision=bf16 "run.out_dir=$R/ds-zero3-bf16" "${C[@]}"
  pool ds-zero3-fp16-torchrun 200 "$R/ds-zero3-fp16-torchrun $M --precision fp16 --ref $FP32" \
    env LAUNCHER=torchrun NPROC_PER_NODE=1 DS_CONFIG=configs/deepspeed/zero3.json launch/deepspeed.sh \
    train.precision=fp16 "run.out_dir=$R/ds-zero3-fp16-torchrun" "${C[@]}"
  pool ds-zero0-fp32 200 "$R/ds-zero0-fp32 $M --precision fp32 --ref $FP32 --rtol 1e-3" \
    env NUM_PROCESSES=1 MASTER_PORT=$((port++)) DS_CONFIG=configs/deepspeed/zero0.json launch/deepspeed.sh \
    train.precision=no "run.out_dir=$R/ds-zero0-fp32" "${C[@]}"

  # accelerate launch, one process: its DDP config (a torchrun-style launch), its one-process config (no
  # launcher), FSDP2, and DeepSpeed (ZeRO-2 in fp16 from the shipped config; ZeRO-3 in bf16 as the tests write it).
  sed -e "s#configs/deepspeed/zero2.json#configs/deepspeed/zero3.json#" -e "s#mixed_precision: 'no'#mixed_precision: 'bf16'#" \
    configs/accelerate/deepspeed.yaml > "$WORK/accelerate_zero3_bf16.yaml"
  pool accel-ddp-fp16 200 "$R/accel-ddp-fp16 $M --precision fp16 --ref $FP32" \
    env ACCELERATE_CONFIG=configs/accelerate/ddp_fp16.yaml NUM_PROCESSES=1 MAIN_PROCESS_PORT=$((port++)) \
    launch/accelerate.sh "run.out_dir=$R/accel-ddp-fp16" "${C[@]}"
  pool accel-ddp-bf16 200 "$R/accel-ddp-bf16 $M --precision bf16 --ref $FP32" \
    env ACCELERATE_CONFIG=configs/accelerate/ddp_bf16.yaml NUM_PROCESSES=1 MAIN_PROCESS_PORT=$((port++)) \
    launch/accelerate.sh "run.out_dir=$R/accel-ddp-bf16" "${C[@]}"
  pool accel-single-bf16 200 "$R/accel-single-bf16 $M --precision bf16 --ref $FP32" \
    env ACCELERATE_CONFIG=configs/accelerate/debug.yaml MIXED_PRECISION=bf16 MAIN_PROCESS_PORT=$((port++)) \
    launch/accelerate.sh "run.out_dir=$R/accel-single-bf16" "${C[@]}"
  pool accel-fsdp2-bf16 200 "$R/accel-fsdp2-bf16 $M --precision bf16 --ref $FP32" \
    env ACCELERATE_CONFIG=configs/accelerate/fsdp2.yaml NUM_PROCESSES=1 MAIN_PROCESS_PORT=$((port++)) \
    launch/accelerate.sh "run.out_dir=$R/accel-fsdp2-bf16" "${C[@]}"
  pool accel-zero2-fp16 200 "$R/accel-zero2-fp16 $M --precision fp16 --ref $FP32" \
    env ACCELERATE_CONFIG=configs/accelerate/deepspeed.yaml NUM_PROCESSES=1 MIXED_PRECISION=fp16 \
    MAIN_PROCESS_PORT=$((port++)) launch/accelerate.sh "run.out_dir=$R/accel-zero2-fp16" "${C[@]}"
  pool accel-zero3-bf16 200 "$R/accel-zero3-bf16 $M --precision bf16 --ref $FP32" \
    env ACCELERATE_CONFIG="$WORK/accelerate_zero3_bf16.yaml" NUM_PROCESSES=1 MAIN_PROCESS_PORT=$((port++)) \
    launch/accelerate.sh "run.out_dir=$R/accel-zero3-bf16" "${C[@]}"

  # torchrun: one process (one GPU: the single-process step under torchrun; NCCL is set and validated), and
  # FSDP2 over a mesh of one (a one-rank NCCL group: the norm's all-reduce runs).
  pool torchrun-fp32 200 "$R/torchrun-fp32 $M --precision fp32 --ref $FP32 --rtol 1e-4" \
    env NPROC_PER_NODE=1 launch/torchrun.sh "dist.backend=$BACKEND" train.precision=no "run.out_dir=$R/torchrun-fp32" "${C[@]}"
  for p in bf16 fp16; do
    pool "fsdp-$p" 200 "$R/fsdp-$p $M --precision $p --ref $FP32" \
      env NPROC_PER_NODE=1 launch/torchrun.sh dist.strategy=fsdp "train.precision=$p" "run.out_dir=$R/fsdp-$p" "${C[@]}"
  done
  # one process, no launcher: bf16 (autocast) and fp16 (autocast + GradScaler)
  for p in bf16 fp16; do
    pool "single-$p" 150 "$R/single-$p $M --precision $p --ref $FP32" \
      env DEVICE="$DEVICE" launch/debug.sh "train.precision=$p" "run.out_dir=$R/single-$p" "${C[@]}"
  done

  # -- the article's CNN (task classify, image batches, SGD): one process in fp32 (its reference) and bf16,
  #    FSDP2 in bf16 (one unit: no ModuleList), DeepSpeed ZeRO-2 in bf16 (its inputs cast to the engine's dtype) --
  local CNN="$WORK/runs/cnn-fp32"
  local -a K=("${C[@]}" "train.epochs=null" "data.file=$WORK/seed_cnn/train_data.pth"
              "data.val_file=$WORK/seed_cnn/val_data.pth")
  "$PY" examples/seed_cnn.py "$WORK/seed_cnn" --train 512 --val 100 > "$WORK/logs/seed-cnn-data.log" 2>&1
  pool cnn-fp32 150 "$CNN $M --precision fp32" \
    env DEVICE="$DEVICE" CONFIG=configs/seed_cnn.yaml launch/debug.sh train.precision=no "run.out_dir=$CNN" "${K[@]}"
  pool cnn-bf16 150 "$R/cnn-bf16 $M --precision bf16" \
    env DEVICE="$DEVICE" CONFIG=configs/seed_cnn.yaml launch/debug.sh train.precision=bf16 "run.out_dir=$R/cnn-bf16" \
    "${K[@]}"
  pool cnn-fsdp-bf16 200 "$R/cnn-fsdp-bf16 $M --precision bf16" \
    env CONFIG=configs/seed_cnn.yaml NPROC_PER_NODE=1 launch/torchrun.sh dist.strategy=fsdp train.precision=bf16 \
    "run.out_dir=$R/cnn-fsdp-bf16" "${K[@]}"
  pool cnn-zero2-bf16 200 "$R/cnn-zero2-bf16 $M --precision bf16" \
    env CONFIG=configs/seed_cnn.yaml NUM_PROCESSES=1 MASTER_PORT=$((port++)) DS_CONFIG=configs/deepspeed/zero2.json \
    launch/deepspeed.sh train.precision=bf16 "run.out_dir=$R/cnn-zero2-bf16" "${K[@]}"

  # -- the Clipper in users' own loops: the CUDA sync test, and each own-loop example under its launcher --
  pool pytest-clipper-cuda 200 - "$PY" -m pytest -q -p no:cacheprovider tests/test_clipper.py -k cuda
  pool own-loop-ddp 150 - "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 examples/own_loop_ddp.py \
    --steps 12 --every 4
  pool own-loop-fsdp 150 - "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 examples/own_loop_ddp.py \
    --steps 12 --every 4 --fsdp
  pool own-loop-fp16 150 - "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 examples/own_loop_ddp.py \
    --steps 12 --every 4 --fp16
  pool own-loop-accelerate 150 - "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
    --dynamo_backend no --mixed_precision fp16 --main_process_port $((port++)) examples/own_loop_accelerate.py \
    --steps 12 --every 4
  pool own-loop-deepspeed 200 - "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port $((port++)) \
    examples/own_loop_deepspeed.py --steps 12 --every 4 --accum 2

  # -- 2 or more GPUs: DDP and dist-train verify (they need 2 ranks; each rank binds cuda:LOCAL_RANK) --
  if (( ngpu >= 2 )); then
    pool ddp-2gpu-bf16 200 "$R/ddp-2gpu-bf16 $M --precision bf16 --ref $FP32" \
      env NPROC_PER_NODE=2 launch/torchrun.sh train.precision=bf16 "run.out_dir=$R/ddp-2gpu-bf16" "${C[@]}"
    pool verify-ddp-2gpu 200 - env COMMAND=verify NPROC_PER_NODE=2 launch/torchrun.sh "train.device=$DEVICE" --steps 5
    pool verify-fsdp-2gpu 200 - env COMMAND=verify NPROC_PER_NODE=2 launch/torchrun.sh dist.strategy=fsdp \
      "train.device=$DEVICE" --steps 5
    pool verify-zero2-2gpu 200 - env COMMAND=verify NUM_PROCESSES=2 MASTER_PORT=$((port++)) \
      DS_CONFIG=configs/deepspeed/zero2.json launch/deepspeed.sh "train.device=$DEVICE" --steps 5
  else
    for j in ddp-2gpu-bf16 verify-ddp-2gpu verify-fsdp-2gpu verify-zero2-2gpu; do
      not_applicable "$j" "needs 2 GPUs, $ngpu here"
    done
  fi
  wait

  # ---- summary ----
  local name status rc secs note failed=0 skipped=0
  echo
  echo "===== SUMMARY ($(( SECONDS ))s in all) ====="
  for name in "${ORDER[@]}"; do
    if [[ -f "$WORK/res/$name" ]]; then
      read -r status rc secs note < "$WORK/res/$name"
    else
      status=FAIL rc=- secs=0 note="(no result: the check died)"
    fi
    printf '  %-26s %-4s rc=%-4s %4ss %s\n' "$name" "$status" "$rc" "$secs" "$note"
    [[ "$status" == FAIL ]] && failed=$((failed + 1))
    [[ "$status" == SKIP ]] && skipped=$((skipped + 1))
  done
  echo "===== $failed failed, $skipped skipped for time, of ${#ORDER[@]} checks ====="
  (cd "$WORK" && find logs runs -name '*.log' -o -name metrics.jsonl -o -name config.yaml | tar czf "$OUTDIR/gpu_runs.tgz" -T -) \
    2>/dev/null || true
  (( failed == 0 && skipped == 0 ))
}

main 2>&1 | tee "$OUTDIR/gpu_checks.log"
exit "${PIPESTATUS[0]}"
