"""The policy as a torch module: loading (HF, GGUF, LoRA), processes and device placement."""
