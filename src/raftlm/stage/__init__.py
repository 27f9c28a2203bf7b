"""The RAFT stage: collect -> rank -> fine-tune -> record (`loop.py` reads like Algorithm 1).

`rollouts.py` the types a stage hands on; `collect.py` the one Collect primitive; `collectors.py`
how a stage spends its samples (fixed, dynamic, gvm); `rank.py` everything Rank knows;
`finetune.py` and `record.py` the last two steps; `build.py` wires a run from its config.
"""
