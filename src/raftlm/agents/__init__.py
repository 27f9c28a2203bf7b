"""Agents: multi-turn rollouts in which the model calls tools or acts in an environment, kept
token-in, token-out so training sees exactly the tokens the model produced (docs/agents.md).

`rollout.roll_out` samples trajectories turn by turn, a turn joining the sampler's running
batch when its tools answer (`check_rollout` loads and checks what it needs at a run's start);
`turns` is one trajectory between its turns; `tools` loads and runs tools (errors become
observations); `calls` is the Hermes `<tool_call>` format and the default system prompt;
`chat_format` renders prompts and observations with the chat template; `environments` the two
environment shapes; `trajectory` the `Trajectory` record and the `rollout/*` metrics;
`calculator` the built-in tool.
"""

from raftlm.agents.rollout import check_rollout, roll_out, scoring_environments
from raftlm.agents.trajectory import Trajectory, messages, rollout_metrics

__all__ = ["Trajectory", "check_rollout", "messages", "roll_out", "rollout_metrics",
           "scoring_environments"]
