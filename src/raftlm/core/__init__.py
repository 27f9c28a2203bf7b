"""The reference math of RAFT and its family, NumPy only (no torch).

`raft.py`: `raft_alignment`, `raft_iteration`, the selectors and the token-pooled NLL;
`objectives.py`: the objectives' weightings, advantages and loss aggregations;
`collectors.py`: the collectors' decisions (the useful-prompt test, GVM's allocation);
`checks.py`: the input checks behind the public functions' one-line errors.
"""

from raftlm.core.raft import *  # noqa: F403  (the public names, listed once in raft.py)
from raftlm.core.raft import __all__  # noqa: F401
