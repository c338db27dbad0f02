"""What every result record of the research scripts carries, so a file says how it was made.

``write_record(path, rows, args)`` writes ``{"provenance", "config", "rows"}``: the git commit
(and whether the tree had changes), torch and Python versions, torch threads, the command line,
and the script's full arguments. ``read_rows(path)`` reads such a file, or an older bare list.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict[str, Any]:
    """Commit, versions and threads of this process."""
    import torch

    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "argv": sys.argv}


def write_record(path: str | Path, rows: Any, args: Any = None) -> None:
    """Write ``rows`` with the provenance and the script's arguments (an argparse Namespace or dict)."""
    config = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    Path(path).write_text(json.dumps({"provenance": provenance(), "config": config, "rows": rows}, indent=1,
                                     default=str))


def read_rows(path: str | Path) -> list[Any]:
    """The rows of a record (files written before records carried provenance are bare lists)."""
    data = json.loads(Path(path).read_text())
    return data["rows"] if isinstance(data, dict) and "rows" in data else data
