"""raftlm: RAFT (Reward rAnked FineTuning) for language models.

Public API:
- `raft_alignment`, `raft_iteration`: the reference math of RAFT on plain arrays (NumPy only).
- `RaftConfig`: a run's configuration (dataclasses, `RaftConfig.from_yaml(path)`).
- `train(config, resume=False)`: run RAFT; returns the run directory and its metrics.
"""

from typing import Any

from raftlm.config import RaftConfig
from raftlm.core import raft_alignment, raft_iteration

__version__ = "0.1.0"
__all__ = ["RaftConfig", "__version__", "raft_alignment", "raft_iteration", "train"]


def __getattr__(name: str) -> Any:
    # `train` pulls in torch and transformers; import it only when asked for.
    if name == "train":
        from raftlm.stage.loop import train

        return train
    raise AttributeError(f"module 'raftlm' has no attribute {name!r}")
