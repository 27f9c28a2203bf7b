"""RAFT as separate jobs: `raftlm generate | score | select | finetune` (docs/phases.md)."""
