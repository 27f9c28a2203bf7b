"""The reference math of RAFT and its family, NumPy only (no torch).

`raft.py`: `raft_alignment`, `raft_iteration`, the selectors and the token-pooled NLL;
`objectives.py`: the objectives' weightings, advantages and loss aggregations;
`collectors.py`: the collectors' decisions (the useful-prompt test, GVM's allocation);
`checks.py`: the input checks behind the public functions' one-line errors.
"""

from raftlm.core.raft import (
    best_per_prompt,
    best_per_prompt_mask,
    raft_alignment,
    raft_iteration,
    token_pooled_nll,
    top_fraction_mask,
    top_k_per_prompt_mask,
)

__all__ = [
    "best_per_prompt",
    "best_per_prompt_mask",
    "raft_alignment",
    "raft_iteration",
    "token_pooled_nll",
    "top_fraction_mask",
    "top_k_per_prompt_mask",
]
