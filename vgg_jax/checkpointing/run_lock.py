"""One training run per workdir: a lock file naming its owner (paper §3.1 training is resumed, never doubled).

Two trainings on one ``--workdir`` would start from the same checkpoint, overwrite each other's saves
and append every metrics row twice. Process 0 holds ``<workdir>/run.lock`` (JSON: host, pid, start
time, job id, heartbeat, command) from before it reads the workdir until it ends; the job's other
processes follow its verdict (`vgg_jax.runtime.parallel.agree`). A lock left by a dead run is taken
over, with a warning, when its pid on this host is gone, its job id is this run's (``VGG_JAX_JOB_ID``,
else ``SLURM_JOB_ID``), or its heartbeat is older than `STALE_SECONDS` — the only evidence about a
process on another host; otherwise `WorkdirInUseError` names the holder. The lock is created with an
atomic hard link; where there are none (gs://, some FUSE mounts) two starts within a second could
both pass.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from etils import epath

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0
_HELD: set[str] = set()  # lock files held by this process (a second run in it is refused, not taken over)


class WorkdirInUseError(RuntimeError):
    """Another run holds the workdir; the message names its host, pid and job, and the ways out."""


def job_id() -> str:
    return os.environ.get("VGG_JAX_JOB_ID") or os.environ.get("SLURM_JOB_ID") or ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' elsewhere: tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start_time: str) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    try:
        with open(f"/proc/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
        return fields[0] != "Z" and (not start_time or fields[19] == start_time)
    except (OSError, IndexError):
        return True


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def describe(owner: dict[str, Any]) -> str:
    job = f", job {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')}{job}, started {owner.get('started')}"


@dataclasses.dataclass
class Lock:
    """A held workdir lock: `release()` it (a `with` block does), which also stops its heartbeat."""

    path: epath.Path
    owner: dict[str, Any]
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="vgg_jax-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if _read(self.path).get("token") != self.owner["token"]:
                    logging.warning("%s is no longer this run's (another run took it over)", self.path)
                    return
                self.owner["heartbeat"] = time.time()
                temporary = self.path.parent / f"{self.path.name}.{self.owner['token']}"
                temporary.write_text(json.dumps(self.owner))
                temporary.replace(self.path)
            except OSError as error:  # a full disk must not stop training; the lock just ages
                logging.warning("could not refresh %s: %s", self.path, error)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        _HELD.discard(str(self.path))
        try:
            if _read(self.path).get("token") == self.owner["token"]:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(path: epath.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _create(path: epath.Path, owner: dict[str, Any]) -> bool:
    """Writes the lock if there is none; True when this call created it."""
    temporary = path.parent / f"{path.name}.{owner['token']}"
    temporary.write_text(json.dumps(owner))
    try:
        if not str(path).startswith(("gs://", "s3://")):
            try:
                os.link(temporary, path)  # atomic, and fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError:
                pass  # a file system without hard links: the check-then-write below
        if path.exists():
            return False
        temporary.replace(path)
        return _read(path).get("token") == owner["token"]
    finally:
        if temporary.exists():
            temporary.unlink()


def stale_reason(holder: dict[str, Any], *, host: str, job: str, now: float) -> str | None:
    """Why the holder of a lock is gone (it may be taken over), or None while it may still run."""
    if holder.get("unreadable"):
        return "the lock file is unreadable"
    if holder.get("host") == host:
        if holder.get("pid") == os.getpid() and str(holder.get("path")) not in _HELD:
            return "left by an earlier run in this process"
        if not _alive(int(holder.get("pid", -1)), str(holder.get("start_time", ""))):
            return f"pid {holder.get('pid')} is no longer running on this host"
        return None
    if job and holder.get("job") == job:
        return f"it is this job's (id {job}): the job was restarted"
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_SECONDS:
        return f"its last heartbeat was {age:.0f} s ago (the limit is {STALE_SECONDS:.0f} s)"
    return None


def acquire(workdir: str) -> Lock:
    """Takes `workdir`'s lock for this process (see the module doc), or raises `WorkdirInUseError`."""
    path = epath.Path(workdir) / LOCK_FILE
    host = socket.gethostname()
    owner = {
        "host": host,
        "pid": os.getpid(),
        "start_time": _start_time(os.getpid()),
        "job": job_id(),
        "started": _now(),
        "heartbeat": time.time(),
        "command": " ".join(sys.argv),
        "path": str(path),
        "token": uuid.uuid4().hex,
    }
    for _ in range(3):
        if _create(path, owner):
            _HELD.add(str(path))
            return Lock(path, owner)
        holder = _read(path)
        if not holder:
            continue  # released meanwhile
        reason = stale_reason(holder, host=host, job=owner["job"], now=time.time())
        if reason is None:
            raise WorkdirInUseError(_in_use_message(workdir, path, holder))
        logging.warning("%s: taking over the lock of %s: %s", path, describe(holder), reason)
        path.unlink(missing_ok=True)
    raise WorkdirInUseError(f"{path}: another run started at the same time took the lock: {describe(_read(path))}")


def _in_use_message(workdir: str, path: epath.Path, holder: dict[str, Any]) -> str:
    heartbeat = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"--workdir={workdir} is in use by another run: {describe(holder)} (last heartbeat {heartbeat:.0f} s ago; "
        f"command: {holder.get('command', '?')}). Two runs on one workdir would overwrite each other's checkpoints and "
        "metrics. Wait for it to end, or stop it (SIGTERM saves a checkpoint; rerunning then resumes), or give this "
        f"run another --workdir. If that run is dead on another host, its lock is taken over {STALE_SECONDS:.0f} s "
        f"after its last heartbeat; delete {path} to take it over now."
    )
