"""Rank: score responses (built-in checks, user functions, reward models) and select the best.

The built-in checks are importable from here, so `raftlm.rewards:numeric_answer` works as a
reward term like any user function.
"""

from raftlm.rewards.verifiable import BUILTIN_REWARDS, math_answer, numeric_answer

__all__ = ["BUILTIN_REWARDS", "math_answer", "numeric_answer"]
