"""CPU threads: how many, and how idle OpenMP threads wait.

torch runs its CPU kernels on an OpenMP pool (libgomp in the pip wheels), one thread per core.
By default a libgomp thread that finished its share busy-waits ("spins") for the next parallel
region. On a machine whose cores other programs keep busy, those spinning threads take the
cores from the threads that still have work (and from the other programs): `raftlm sample` ran
3-4x slower at load 5 on 2 cores (issue 34), and a decode step, which is many small parallel
regions, suffers most. So raftlm

- makes idle threads sleep instead (``OMP_WAIT_POLICY=PASSIVE``; a value the user set wins).
  libgomp reads the variable once, when torch loads it, so `prefer_passive_wait` runs before the
  first ``import torch``: in ``raftlm``'s entry point (``raftlm/__main__.py``);
- keeps torch's thread count (one per core) unless ``--threads N`` (``run.threads`` for
  ``raftlm train``) or ``OMP_NUM_THREADS`` says otherwise: with passive waiting, all cores
  measured faster than one thread both idle and loaded (``benchmarks/threads.py``, numbers in
  docs/usage.md).
"""

from __future__ import annotations

import os

from raftlm.errors import InvalidInput

WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"


def prefer_passive_wait() -> None:
    """Let idle OpenMP threads sleep (unless the user chose a policy); call before torch's
    first import, which is when libgomp reads it."""
    if not os.environ.get(WAIT_POLICY_VARIABLE):  # libgomp rejects an empty value
        os.environ[WAIT_POLICY_VARIABLE] = "PASSIVE"


def configure_threads(requested: int | None) -> int:
    """Use ``requested`` CPU threads (``--threads``, ``run.threads``; 0 or None: torch's
    default, one per core, or ``OMP_NUM_THREADS``). Returns the count in use."""
    if requested is not None and requested < 0:
        raise InvalidInput(f"--threads: expected a positive number of threads, got {requested}")
    import torch

    if requested:
        torch.set_num_threads(requested)
    return torch.get_num_threads()
