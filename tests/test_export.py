"""`raftlm export`: a run's policy as a standalone HF folder and as a GGUF file."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from tiny import CHATML, save_tiny_model, tiny_bpe_tokenizer, tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from raftlm import RaftConfig, train
from raftlm.cli import main as cli_main
from raftlm.config import ModelConfig
from raftlm.data.prompts import render_chat
from raftlm.models.loading import load_tokenizer, materialize_model
from raftlm.run.rundir import RunDir
from raftlm.sampling.generate import generate
from raftlm.tools.export import export
from raftlm.tools.target import load_target

PROMPTS = ["What is 3 + 4?", "What is 12 + 30?", "Hello there", "Say 7"]
REWARD_FILE = """
def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One RAFT stage (LoRA) of a tiny random Llama with a byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = tiny_bpe_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"prompt": p, "answer": "7"} for p in PROMPTS]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARD_FILE)
    config = RaftConfig.from_dict({
        "run": {"output_dir": str(root / "run"), "seed": 3},
        "model": {"path": str(root / "model"), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(root / "prompts.jsonl"),
                 "eval_file": str(root / "prompts.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 4, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 8, "temperature": 0.7},
        "reward": {"terms": [f"{root / 'rewards.py'}:length"]},
        "training": {"learning_rate": 5e-2, "epochs": 2},
        "tracking": {"report": False},
    })
    return train(config).run_dir


def greedy(model, tokenizer, prompt: str) -> list[int]:
    _, ids = render_chat(prompt, tokenizer)
    settings = RaftConfig().generation
    return generate(model, tokenizer, [ids], 1, settings, greedy=True, max_new_tokens=12,
                    seeds=[0])[0][0].token_ids


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def hf_export(run_dir, tmp_path_factory):
    return export(run_dir, tmp_path_factory.mktemp("hf") / "model", "hf")


def test_hf_export_is_the_stage_policy_with_lora_merged(run_dir, hf_export):
    policy = load_target(run_dir)
    base = load_target(run_dir, stage=0)
    exported = AutoModelForCausalLM.from_pretrained(hf_export).eval()
    ids = render_chat(PROMPTS[0], policy.tokenizer)[1]
    assert not (hf_export / "adapter_model.safetensors").exists()
    assert torch.allclose(logits_of(exported, ids), logits_of(policy.model, ids), atol=1e-5)
    assert not torch.allclose(logits_of(exported, ids), logits_of(base.model, ids), atol=1e-3)


def test_hf_export_model_card_states_base_config_and_results(run_dir, hf_export):
    card = (hf_export / "README.md").read_text()
    final = RunDir(run_dir).read_metrics()[-1]
    assert f"base_model: {run_dir.parent / 'model'}" in card
    (row,) = [line for line in card.splitlines() if line.startswith("| 1 (exported) |")]
    assert f"| {final['eval/reward_mean']:.3f} |" in row
    assert f"| {final['eval/kl_to_initial']:.3f} |" in row
    assert "samples_per_prompt: 2" in card  # the run's config


def test_hf_export_carries_tokenizer_and_generation_config(run_dir, hf_export):
    settings = json.loads((hf_export / "generation_config.json").read_text())
    tokenizer = load_tokenizer(hf_export)
    assert tokenizer.chat_template == CHATML
    assert settings["eos_token_id"] == tokenizer.eos_token_id
    assert settings["temperature"] == 0.7 and settings["do_sample"] is True


def test_gguf_round_trip_gives_the_same_greedy_output(run_dir, tmp_path):
    out = export(run_dir, tmp_path / "policy.gguf", "gguf", gguf_dtype="f32")
    folder = materialize_model(ModelConfig(path=str(out), cache_dir=str(tmp_path / "cache")))
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    reloaded_tokenizer = load_tokenizer(folder)
    policy = load_target(run_dir)
    for prompt in PROMPTS:
        assert render_chat(prompt, reloaded_tokenizer) == render_chat(prompt, policy.tokenizer)
        assert greedy(reloaded, reloaded_tokenizer, prompt) == greedy(
            policy.model, policy.tokenizer, prompt)


def test_gguf_file_holds_llama_metadata_and_the_tokenizer(run_dir, tmp_path):
    out = export(run_dir, tmp_path / "policy.gguf", "gguf")
    fields = gguf.GGUFReader(out).fields
    tokenizer = load_target(run_dir, stage=0).tokenizer
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == CHATML
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert fields["tokenizer.ggml.token_type"].contents()[im_start] == gguf.TokenType.CONTROL


def test_gguf_f16_stores_matrices_in_f16_and_norms_in_f32(run_dir, tmp_path):
    out = export(run_dir, tmp_path / "policy.gguf", "gguf", gguf_dtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd


def test_gguf_export_refuses_a_tokenizer_that_is_not_byte_level_bpe(tmp_path):
    model = save_tiny_model(tmp_path / "char_model")  # character-level WordLevel tokenizer
    with pytest.raises(ValueError, match="needs a byte-level BPE tokenizer"):
        export(model, tmp_path / "m.gguf", "gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_refuses_an_existing_output(run_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    code = cli_main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "taken")])
    assert code == 2
    assert "raftlm export: error: --out:" in capsys.readouterr().err


def test_cli_export_names_the_kept_stages_for_a_missing_one(run_dir, tmp_path, capsys):
    args = ["export", str(run_dir), "--stage", "5", "--format", "gguf", "--out",
            str(tmp_path / "x.gguf")]
    assert cli_main(args) == 2
    assert "--stage 5: no checkpoint" in capsys.readouterr().err
