"""A resumable job's run folder (batch, prepare): one driver at a time, and a rerun only with the same plan."""
from __future__ import annotations

import json
import os
from pathlib import Path

from actors.errors import InputError


class RunFolderError(InputError):
    """The run folder refuses this run (another driver holds it, or it holds a run with other settings)."""


def lock_run_folder(out: Path, job: str):
    """An exclusive lock on OUT/.lock, held while the returned handle is open (or its process lives): two
    drivers on one folder would each write the blocks they lack."""
    import fcntl

    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunFolderError(f"--out {out}: another {job} run is writing there (wait for it, or choose a new --out)") from None
    return handle


def check_run_plan(out: Path, plan: dict) -> None:
    """Write OUT/plan.json on the first run; on a rerun refuse any difference (results would mix)."""
    path = out / "plan.json"
    if not path.exists():
        temp = path.with_name(".plan.json.tmp")
        temp.write_text(json.dumps(plan, indent=1) + "\n")
        os.replace(temp, path)
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(plan))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise RunFolderError(f"--out {out} holds a run with other settings ({', '.join(changed)} differ): rerun with "
                       "the same inputs and settings to resume it, or choose a new --out")
