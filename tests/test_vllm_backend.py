"""The vLLM backend: its pure mappings run anywhere; generation itself needs vLLM and a GPU."""

import pytest
import torch
from tiny import save_tiny_model, tiny_tokenizer

from raftlm.config import ConfigError, GenerationConfig, VllmConfig
from raftlm.sampling.vllm import (
    VLLM_NEEDED,
    check_vllm_available,
    engine_kwargs,
    sampling_params_kwargs,
    to_completion,
)

EOS = 2  # <|im_end|> in the tiny tokenizer


def test_sampling_params_carry_raftlm_settings_and_the_prompt_seed():
    config = GenerationConfig(temperature=0.7, top_p=0.9, top_k=0, stop_strings=["\n\n"])
    kwargs = sampling_params_kwargs(config, 8, seed=123, greedy=False, max_new_tokens=32,
                                    eos_ids={EOS})
    assert kwargs == {
        "n": 8, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 32,
        "stop": ["\n\n"], "include_stop_str_in_output": True, "stop_token_ids": [EOS],
        "seed": 123,
    }


def test_greedy_sampling_params_decode_once_at_temperature_zero():
    kwargs = sampling_params_kwargs(GenerationConfig(top_k=5), 4, seed=1, greedy=True,
                                    max_new_tokens=8, eos_ids={EOS})
    assert (kwargs["n"], kwargs["temperature"], kwargs["stop"]) == (1, 0.0, None)
    assert "top_k" not in kwargs


def test_engine_runs_in_process_with_lora_rank_rounded_up_to_one_vllm_serves():
    config = GenerationConfig(vllm=VllmConfig(gpu_memory_utilization=0.4))
    kwargs = engine_kwargs(config, "/models/x", lora_rank=12, num_processes=1)
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"]) == (True, 16)
    assert kwargs["gpu_memory_utilization"] == 0.4


def test_the_engine_caches_prefixes_so_an_agents_next_turn_reuses_its_trajectorys_kv():
    assert engine_kwargs(GenerationConfig(), "/m", None, 1)["enable_prefix_caching"] is True


def test_tensor_parallel_engines_need_a_single_process():
    config = GenerationConfig(vllm=VllmConfig(tensor_parallel_size=2))
    assert "distributed_executor_backend" not in engine_kwargs(config, "/m", None, 1)
    with pytest.raises(ValueError, match="vllm.tensor_parallel_size: expected 1 with 2 processes"):
        engine_kwargs(config, "/m", None, num_processes=2)


def test_completions_keep_their_stop_token_and_end_at_the_stop_string():
    tok = tiny_tokenizer()
    ids = tok.encode("ab", add_special_tokens=False)
    eos = to_completion(tok, ids + [EOS], "stop", None, [], {EOS})
    assert (eos.text, eos.token_ids[-1], eos.finish_reason) == ("ab", EOS, "eos")
    # An engine that drops the eos from the ids: it is put back (SFT must learn to stop).
    assert to_completion(tok, ids, "stop", None, [], {EOS}).token_ids == ids + [EOS]
    stop_ids = tok.encode("a.b", add_special_tokens=False)
    stop = to_completion(tok, stop_ids, "stop", ".", ["."], {EOS})
    assert (stop.text, stop.finish_reason) == ("a.", "stop_string")
    assert to_completion(tok, ids, "length", None, [], {EOS}).finish_reason == "length"


@pytest.mark.skipif(torch.cuda.is_available() and __import__("importlib").util.find_spec("vllm")
                    is not None, reason="vLLM and a GPU are present")
def test_without_vllm_or_a_gpu_the_error_says_what_to_install():
    with pytest.raises(ConfigError, match="pip install raftlm\\[vllm\\]` and a CUDA GPU"):
        check_vllm_available()
    assert "generation.backend=vllm" in VLLM_NEEDED


def test_a_run_asking_for_vllm_fails_before_loading_anything(tmp_path, monkeypatch):
    import raftlm.sampling.vllm as backend
    from raftlm import RaftConfig, train

    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    config = RaftConfig.from_dict({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"path": str(tmp_path / "no-such-model"), "dtype": "fp32"},
        "data": {"task": "arithmetic"},
        "generation": {"backend": "vllm"},
    })
    with pytest.raises(ConfigError, match="vllm is not installed"):
        train(config)


def test_vllm_samples_with_the_policys_current_lora_weights(tmp_path):
    pytest.importorskip("vllm", reason="needs `pip install raftlm[vllm]`")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raftlm.sampling.generate import generate

    folder = save_tiny_model(tmp_path / "model")
    tok = tiny_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(folder).cuda()
    policy = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    config = GenerationConfig(backend="vllm", max_new_tokens=8,
                              vllm=VllmConfig(gpu_memory_utilization=0.2))
    prompts = [tok.encode("Say 1", add_special_tokens=False)] * 2
    first = generate(policy, tok, prompts, 3, config, seeds=[5, 5])
    assert [len(row) for row in first] == [3, 3]
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in first[1]]  # same seed
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    second = generate(policy, tok, prompts, 3, config, seeds=[5, 5])
    assert [c.token_ids for c in second[0]] != [c.token_ids for c in first[0]]
