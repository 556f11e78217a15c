"""`.ci/run` runs the README's test command exactly, with the 15 slowest tests and the suite's wall time shown,
and refuses to skip the Slurm tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def _readme_test_command() -> str:
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (line,) = [ln for ln in block.splitlines() if "pytest" in ln]
    return line


def test_ci_runs_the_readme_test_command_with_durations_and_slurm_required():
    ci = (ROOT / ".ci/run").read_text().splitlines()
    command = _readme_test_command()
    assert command == "pip install -e '.[dev]' && python -m pytest -q"
    assert ci[-1] == command  # the last thing CI does, verbatim
    assert 'export PYTEST_ADDOPTS="--durations=15"' in ci
    assert "export DIST_TRAIN_REQUIRE_SLURM=1" in ci


def test_the_suite_prints_its_wall_time():
    """tests/conftest.py's terminal summary, on any run of the suite (here the test above alone)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests/test_ci.py::test_ci_runs_the_readme_test_command_with_durations_and_slurm_required")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^suite wall time: \d+ s$", p.stdout, re.M), p.stdout
