"""User-facing tools on a finished run: `raftlm export`, `raftlm sample`, `raftlm chat`."""
