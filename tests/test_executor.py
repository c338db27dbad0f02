"""The local worker pool: workers do not outlive a parent killed by a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TASK = '''
import os, time
from pathlib import Path

def sleep_task(folder):
    Path(folder, f"{os.getpid()}.pid").write_text("")
    time.sleep(120)
'''

PARENT = '''
import sys
sys.path.insert(0, {folder!r})
from soda_backdoor.executor import run_tasks
from sleepy import sleep_task
for outcome in run_tasks(sleep_task, [{folder!r}] * 2, jobs=2):
    print(outcome)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def test_workers_exit_when_the_parent_is_terminated(tmp_path: Path) -> None:
    (tmp_path / "sleepy.py").write_text(TASK)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARENT.format(folder=str(tmp_path)))])
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "workers did not start"
            time.sleep(0.2)
        workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
        parent.send_signal(signal.SIGTERM)
        parent.wait(30)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a worker outlived its parent"
    finally:
        parent.kill()
        for p in tmp_path.glob("*.pid"):
            try:
                os.kill(int(p.stem), signal.SIGKILL)
            except ProcessLookupError:
                pass
