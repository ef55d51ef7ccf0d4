"""Stop requests: SIGUSR1 (SLURM's ``--signal``) and SIGTERM (preemption, ``scancel``, a plain ``kill``).

The handler only records the signal. The loop polls collectively (a host-side all-reduce over a gloo
group, no GPU synchronisation) every ``every`` steps whatever ``--print_freq`` is, at every epoch
end, and inside long phases (warm-up steps, the kNN monitor), so every rank stops at the same
iteration, writes a checkpoint and returns. A second signal of the same kind ends the process at
once (the default action), so an impatient ``kill; kill`` still works.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from .. import distributed as D

log = logging.getLogger("ssl")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignal:
    def __init__(self, every: int = 10):
        if every < 1:
            raise ValueError("stop checks need every >= 1")
        self.every = every
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signum:  # the second one: default action now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("received %s: the run checkpoints and stops within %d steps (send it again to end now)",
                    signal.Signals(signum).name, self.every)

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def poll(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal."""
        return D.any_rank(self.received is not None)


def requeue_slurm_job() -> bool:
    """``--requeue``: after the stop checkpoint is written, put the SLURM job back in the queue with
    ``scontrol requeue $SLURM_JOB_ID`` (what the official SwAV / Barlow Twins scripts do on SIGUSR1); the
    requeued job runs the same command and auto-resumes. Rank 0 only. Returns whether it was requeued."""
    import shutil
    import subprocess
    env = os.environ
    array = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = "_".join(array) if all(array) else env.get("SLURM_JOB_ID")
    if not job:
        log.warning("--requeue: not running under SLURM (no SLURM_JOB_ID): run the same command again to resume")
        return False
    if shutil.which("scontrol") is None:
        log.warning("--requeue: scontrol not found on PATH: job %s not requeued; resubmit it to resume", job)
        return False
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        log.warning("--requeue: `scontrol requeue %s` failed: %s", job, (r.stderr or r.stdout).strip()[:200])
        return False
    log.warning("requeued SLURM job %s: it resumes from the checkpoint just written", job)
    return True
