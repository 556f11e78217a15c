"""Every command in the ```bash blocks of the README and of the pages in docs/ runs verbatim, in order (the
README's first, then DOCS), in a fresh copy of the repository (with few steps). docs/clipper.md's
commands run in tests/test_clipper.py, which checks what they print. Every relative link of those pages
leads to a file, and a #fragment to a heading of that page.

What is not run, and why: `pip install ...` (CI has just done it; the CPU wheel
index is not reachable from CI) and `python -m pytest` (the suite running this).
Few steps: training commands get `train.max_steps=20` appended (an override, as
a user would add one), but for recipes whose steps matter (VERBATIM_KEYS);
benchmarks `--quick` (each code path once at tiny sizes). Multi-node
templates are ```text blocks, which need other machines.

The commands run as written, launchers included; the processes they start
(`dist-train`, `python -m dist_train`, and the launchers' own modules and the
workers they start) are forked warm by the test server through the shims in
tests/bin, so the test pays torch's import once; so are the benchmark scripts
(`python benchmarks/NAME.py`), whose --quick runs are smoke runs, not
measurements. The launcher tests (test_distributed, test_strategies,
test_deepspeed, test_robustness, test_slurm) start every launcher's workers as
fresh interpreters. The stability study's --quick grid is checked here
(tests/test_stability.check_study): the suite runs it once.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests import forkserver
from tests.conftest import ROOT, SHIMS
from tests.test_stability import check_study

FEW_STEPS = "train.max_steps=20"
#: A command naming one of these is a recipe whose steps matter (which checkpoints exist, which batches are
#: left out): it runs as written, all its steps, never shortened.
VERBATIM_KEYS = ("train.resume=", "train.checkpoint_every=", "data.skip_steps")


#: The pages whose commands this test runs, in this order (each page's commands in its own order).
DOCS = ("README.md", "docs/article.md", "docs/step.md", "docs/strategies.md", "docs/metrics.md", "docs/clipping.md",
        "docs/configuration.md", "docs/data.md", "docs/errors.md", "docs/checkpoints.md", "docs/slurm.md",
        "docs/benchmarks.md", "docs/contributing.md")


def readme_commands() -> list[str]:
    commands = []
    for page in DOCS:
        text = (ROOT / page).read_text(encoding="utf-8")
        for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
            for line in block.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    commands.append(line)
    return commands


def test_every_page_is_run_or_named():
    pages = {"README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))}
    assert pages == set(DOCS) | {"docs/clipper.md"}


def test_the_front_pages_launch_lines_are_on_their_pages():
    """The front page's launch modes and own-loop command are lines of the docs pages, where the docs tests run
    them (or, for sbatch, test_slurm runs the script): a changed command cannot stay behind on the front page."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for marker in ("launch-modes", "own-loop")
             for line in readme.split(f"<!-- {marker} -->")[1].splitlines()[2:-1]]
    pages = "\n".join((ROOT / page).read_text(encoding="utf-8") for page in (*DOCS[1:], "docs/clipper.md"))
    assert len(lines) == 7
    for line in lines:
        assert line in pages, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_leads_somewhere():
    """The mistakes table's links, the docs map and each page's links: a file that exists, and a #fragment that
    is a heading of that page (so moving a section cannot leave the front page pointing nowhere)."""
    checked = 0
    for page in (*DOCS, "docs/clipper.md"):
        src = ROOT / page
        text = src.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, fragment = target.partition("#")
            dest = (src.parent / path).resolve() if path else src
            assert dest.exists(), f"{page}: link to {target}: no such file"
            if fragment:
                headings = re.findall(r"^#+ (.*)$", dest.read_text(encoding="utf-8"), flags=re.M)
                assert fragment in {slug(h) for h in headings}, f"{page}: link to {target}: no such heading"
            checked += 1
    assert checked >= 30


def runnable(command: str) -> str | None:
    """The part of a README line this test runs (None: nothing), shortened to few steps."""
    parts = [p.strip() for p in command.split("&&")]
    parts = [p for p in parts if shlex.split(p)[0] != "pip" and "-m pytest" not in p]
    if not parts:
        return None
    out = []
    for p in parts:
        p = re.sub(r"\s+#.*$", "", p)  # a trailing comment would swallow what is appended
        if "benchmarks/" in p and "--quick" not in p:  # every benchmark's smoke run (benchmarks/quick.py)
            p += " --quick"
        elif (("dist-train train" in p or "launch/" in p) and "COMMAND=verify" not in p
              and not any(k in p for k in VERBATIM_KEYS)):
            # A config that trains by epochs (configs/seed_cnn.yaml) is shortened to steps too.
            p += f" {'train.epochs=null ' if 'seed_cnn.yaml' in p else ''}{FEW_STEPS}"
        out.append(p)
    return " && ".join(out)


def test_readme_lists_the_commands_this_test_expects():
    commands = readme_commands()
    assert commands[0] == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert commands[1] == "pip install -e . && dist-train train --config configs/debug.yaml"
    assert "pip install -e '.[dev]' && python -m pytest -q" in commands
    assert sum(runnable(c) is not None for c in commands) >= 8
    assert runnable("launch/debug.sh run.out_dir=runs/x  # one process") == f"launch/debug.sh run.out_dir=runs/x {FEW_STEPS}"


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("readme") / "dist_train"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache"))
    return dst


def test_every_readme_command_runs_verbatim_in_order(fresh_copy, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    bin_dir = os.path.dirname(sys.executable)  # where `dist-train` and `python` of this environment live
    # `dist-train ...`, `python -m dist_train ...`, the launchers' modules (and so their workers) and the
    # benchmark scripts are forked warm by the test server (the shims in tests/bin, ahead of bin_dir); every
    # other `python` is the real one.
    forkserver.ForkServer.get()
    env.update(PATH=f"{SHIMS}{os.pathsep}{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(fresh_copy),
               NETRC=str(netrc), WANDB_SILENT="true", DIST_TRAIN_TEST_FORKSERVER=os.environ[forkserver.SOCKET_ENV])
    ran, outputs = [], {}
    for command in readme_commands():
        line = runnable(command)
        if line is None:
            continue
        p = subprocess.run(["bash", "-c", line], cwd=fresh_copy, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"README command failed ({p.returncode}): {line}\n{p.stdout}\n{p.stderr}"
        assert "Traceback" not in p.stderr, line
        ran.append(line)
        outputs[line] = p.stdout
    runs = fresh_copy / "runs"
    for name in ("debug", "ddp", "debug-script", "bf16", "text", "convlm", "spiky-skip"):
        assert (runs / name / "metrics.jsonl").is_file(), name
    # The roll-back recipe as written: its spike is where the text says, and the fork trains from there on.
    import json

    spikes = [json.loads(line) for line in (runs / "spiky" / "spikes.jsonl").read_text().splitlines()]
    assert spikes and spikes[0]["batch"] == 26, spikes[:1]
    forked = [json.loads(line)["step"] for line in (runs / "spiky-skip" / "metrics.jsonl").read_text().splitlines()]
    assert forked[0] > 20 and forked[-1] == 300, forked
    assert (runs / "text" / "vocab.json").is_file()
    # The stability study's --quick grid: every cell, and its table's figures re-computed from its cells.
    (study,) = [line for line in ran if "benchmarks/stability.py" in line]
    check_study(fresh_copy / shlex.split(study)[shlex.split(study).index("--out") + 1], outputs[study])
    assert len(ran) >= 8
