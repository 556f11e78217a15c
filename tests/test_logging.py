"""Progress output and W&B mode resolution (pure, no processes)."""

from __future__ import annotations

import io
import re

import pytest

from dist_train.config import ProgressMode as Progress, WandbMode
from dist_train.progress import ProgressReporter
from dist_train.wandb_sink import api_key_configured, resolve_mode

RECORD = {"step": 10, "train/loss": 1.5, "grad_norm/raw": 2.0, "grad_norm/clipped": 1.0, "optim/skipped_steps": 0}


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_plain_lines_when_not_a_terminal():
    s = Stream(tty=False)
    p = ProgressReporter(Progress.auto, total=20, stream=s)
    p.step(None)
    p.step(RECORD)
    p.close()
    line = s.getvalue()
    # wall clock, step, elapsed and ETA, then every logged number
    assert re.fullmatch(r"\d\d:\d\d:\d\d step 10/20 \[0:00:\d\d elapsed, 0:00:\d\d left\] "
                        r"loss 1\.500 grad_norm 2\.000 -> 1\.000 skipped_steps 0\n", line), line


def test_progress_bar_on_a_terminal():
    s = Stream(tty=True)
    p = ProgressReporter(Progress.auto, total=20, stream=s)
    assert p.bar is not None
    p.step(RECORD)
    p.close()
    assert "1/20" in s.getvalue() and "\r" in s.getvalue()


def test_only_rank_zero_reports():
    s = Stream(tty=False)
    p = ProgressReporter(Progress.plain, total=20, enabled=False, stream=s)
    p.step(RECORD)
    p.message("hello")
    assert s.getvalue() == ""


@pytest.fixture
def clean_home(tmp_path, monkeypatch):
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_wandb_offline_without_a_key(clean_home):
    assert not api_key_configured()
    assert resolve_mode(WandbMode.auto) == "offline"


def test_wandb_online_with_a_key_in_the_environment(clean_home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(WandbMode.auto) == "online"


def test_wandb_online_with_a_key_in_netrc(clean_home):
    netrc = clean_home / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_mode(WandbMode.auto) == "online"


@pytest.mark.parametrize("mode", [WandbMode.offline, WandbMode.online, WandbMode.disabled])
def test_explicit_wandb_mode_wins(clean_home, monkeypatch, mode):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(mode) == mode.value


BAR_SCRIPT = """
import sys
from dist_train.config import ProgressMode as Progress
from dist_train.progress import ProgressReporter
p = ProgressReporter(Progress.auto, total=300, stream=sys.stderr)
rec = {"step": 10, "train/loss": 2.901234, "grad_norm/raw": 1.247001, "grad_norm/clipped": 1.0,
       "grad_norm/clipped_frac": 0.9, "optim/lr": 0.0015, "optim/skipped_steps": 0, "perf/samples_per_sec": 3310.25}
for i in range(150):
    p.step(rec if i % 10 == 9 else None)
p.close()
"""


def test_progress_bar_stays_a_bar_at_80_columns():
    """On a real terminal 80 columns wide: one line of at most 80 columns, the bar at least 20 wide."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.conftest import ROOT

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    p = subprocess.Popen([sys.executable, "-c", BAR_SCRIPT], stdin=follower, stdout=follower, stderr=follower,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, close_fds=True)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=60) == 0
    os.close(leader)
    frames = [f for f in re.split(r"[\r\n]", out.decode("utf-8", "replace")) if f.strip()]
    last = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", frames[-1])
    assert last.startswith("150/300 ") and last.rstrip().endswith("loss 2.901 grad_norm 1.247 -> 1.000"), last
    assert len(last) <= 80, last
    bar = last.split(" ", 1)[1].split(" 00:")[0]
    assert len(bar) >= 20, last  # the bar did not collapse to one character
