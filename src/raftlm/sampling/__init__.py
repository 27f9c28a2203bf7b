"""Collect: sample K responses per prompt (`generate`), on one of three backends.

`generate.py` is the entry point; `fast.py` is raftlm's own sampler, `hf.py` plain HF
`generate`, `vllm.py` the vLLM engine; `completion.py` is what they all return.
"""
