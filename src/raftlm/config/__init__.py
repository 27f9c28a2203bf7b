"""A run's configuration: plain dataclasses loaded from YAML (`RaftConfig.from_yaml`).

`sections.py` holds the dataclasses a user reads (every field with its default and help),
`raft_config.py` assembles them into `RaftConfig` (loading, validation, moved names);
`schema.py` is the machinery under them (typed loading, choices, `--set` overrides) and
`registry.py` the one shape of every registry of choices.
"""

from raftlm.config.raft_config import RaftConfig, field_help
from raftlm.config.schema import ConfigError, field_choices, option
from raftlm.config.sections import (
    EMBEDDED_MODEL,
    DataConfig,
    DynamicConfig,
    EvalConfig,
    GenerationConfig,
    GvmConfig,
    JudgeConfig,
    LoraConfig,
    ModelConfig,
    RaftStageConfig,
    RewardConfig,
    RewardTerm,
    RunConfig,
    SelectionConfig,
    TrackingConfig,
    TrainingConfig,
    VllmConfig,
)

__all__ = [
    "EMBEDDED_MODEL", "ConfigError", "DataConfig", "DynamicConfig", "EvalConfig",
    "GenerationConfig", "GvmConfig", "JudgeConfig", "LoraConfig", "ModelConfig", "RaftConfig",
    "RaftStageConfig", "RewardConfig", "RewardTerm", "RunConfig", "SelectionConfig",
    "TrackingConfig", "TrainingConfig", "VllmConfig", "field_choices", "field_help", "option",
]
