"""raftlm: RAFT (Reward rAnked FineTuning) for language models."""

__version__ = "0.1.0"
