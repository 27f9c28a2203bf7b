"""Write a Llama-architecture model and its byte-level BPE tokenizer as one GGUF file.

Uses the ``gguf`` package's ``GGUFWriter`` and tensor-name map (no llama.cpp needed). What
llama.cpp expects and transformers' GGUF loader reverses: GGUF tensor names (``blk.N.attn_q``),
the rotary-embedding permutation of the q and k projections (HF keeps the two rotated halves
apart, llama.cpp interleaves them), tied output embeddings left out, 1-D norms in f32, and the
tokenizer as ``gpt2`` tokens, token types, merges, special ids and chat template.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raftlm.errors import InvalidInput
from raftlm.run.rundir import share_like_umask

GGUF_DTYPES = {"f16": np.float16, "f32": np.float32}
# llama.cpp's token types (gguf.TokenType): what transformers' loader reads back as special.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def write_gguf(model: Any, tokenizer: Any, out: Path, dtype: str = "f16", name: str = "model",
               base_gguf: Path | None = None) -> Path:
    """Write `model` (a transformers LlamaForCausalLM) and `tokenizer` to the GGUF file `out`.

    ``base_gguf``: the GGUF file the base model came from; its ``tokenizer.ggml.pre`` (the
    pre-tokenizer name llama.cpp keys its split regex on) is carried over.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise InvalidInput(f"--dtype: expected f16 or f32 for gguf, got {dtype!r}")
    config = model.config
    _check_supported(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    os.close(fd)
    share_like_umask(staging)  # mkstemp's private 0600 would hide the file from other users
    try:
        writer = gguf.GGUFWriter(staging, "llama")
        _write_hyperparameters(writer, config, name, dtype, gguf)
        _write_tokenizer(writer, tokenizer, config.vocab_size, _pre_tokenizer(base_gguf, gguf))
        for tensor_name, array in gguf_tensors(model, GGUF_DTYPES[dtype], gguf):
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)  # a crash never leaves a half-written file under the name
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return out


def _check_supported(config: Any) -> None:
    if config.model_type != "llama":
        raise InvalidInput(f"gguf export supports Llama-architecture models; this one is "
                         f"{config.model_type!r} (export --format hf instead)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InvalidInput(f"gguf export: rope scaling {rope.get('rope_type')!r} is not supported")
    if config.attention_bias or config.mlp_bias:
        raise InvalidInput("gguf export: Llama models with attention or MLP biases are not "
                           "supported")


def permute_rotary(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's q/k projection rows (each head's two rotary halves apart) in llama.cpp's order
    (the halves interleaved); transformers' GGUF loader applies the inverse."""
    rows = weights.shape[0]
    return (weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model: Any, dtype: type, gguf: Any) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every weight; norms stay f32 as llama.cpp expects."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = []
    for hf_name, weight in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        stem = hf_name.removesuffix(".weight")
        mapped = names.get_name(stem)
        if mapped is None or not hf_name.endswith(".weight"):
            raise InvalidInput(f"gguf export: no GGUF name for tensor {hf_name}")
        weight = weight.detach().float().cpu()
        if stem.endswith("self_attn.q_proj"):
            weight = permute_rotary(weight, config.num_attention_heads)
        elif stem.endswith("self_attn.k_proj"):
            weight = permute_rotary(weight, config.num_key_value_heads)
        array = weight.numpy().astype(np.float32 if weight.ndim == 1 else dtype)
        tensors.append((f"{mapped}.weight", array))
    return tensors


def _write_hyperparameters(writer: Any, config: Any, name: str, dtype: str, gguf: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16"
                         else gguf.LlamaFileType.ALL_F32)


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = (spec.get("decoder") or {}).get("type")
    if spec["model"]["type"] != "BPE" or decoder != "ByteLevel":
        raise InvalidInput("gguf export needs a byte-level BPE tokenizer (GPT-2 style); this one "
                         f"is {spec['model']['type']} with a {decoder} decoder")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(CONTROL if i in added and added[i].special
                         else USER_DEFINED if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in [(tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)]:
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(base_gguf: Path | None, gguf: Any) -> str:
    if base_gguf is not None and base_gguf.is_file():
        field = gguf.GGUFReader(base_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return "default"
