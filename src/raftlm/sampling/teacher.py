"""`generation.teacher`: another model samples a share of each prompt's K (docs/teaching.md), as
Llama 2 sampled its 70B model to teach the smaller ones and RFT pools several models' samples.

Two kinds, one interface (`Teacher.sample`, shaped like `generate`):

- a local model (HF folder, .gguf, the embedded model), loaded like the policy and kept beside
  it for the whole run (`offload: phases` does not move it). It must share the policy's
  tokenizer: its token ids are trained on as they are. It samples with raftlm's own sampler,
  so its sample j of a prompt depends on (run seed, stage, prompt id, j) alone;
- an OpenAI-compatible server (`base_url`): one chat-completions request per sample, with a
  seed from the same four numbers, so the samples are as reproducible as the server makes
  seeded requests (raftlm's own `serve` does). The answer's text is tokenized with the
  policy's tokenizer, cut to generation.max_new_tokens, and ends with the eos token when the
  server says it stopped (finish_reason "stop").

Neither records log-probs the policy could use: the stage drops them (`collect.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from raftlm.config import ConfigError, GenerationConfig, RaftConfig
from raftlm.config.teaching import TeacherConfig
from raftlm.data.prompts import PromptRecord
from raftlm.errors import UserError
from raftlm.models.loading import load_policy
from raftlm.rewards.http import Endpoint, RequestFailed
from raftlm.rewards.judge import answer_text
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import GENERATION_BACKENDS, generate

OnFinish = Callable[[int, int, Completion], None]


class Teacher(Protocol):
    """`sample(generation, prompts, counts, seeds, done, on_finish)`: `counts[i]` samples of
    prompt i under the stage's generation settings (the teacher's temperature where it has
    one), as `generate` gives them: `done[(i, j)]` kept, the others sampled and reported to
    `on_finish(i, j, completion)` as each finishes."""

    name: str  # `source` of its samples in candidates.jsonl

    def sample(self, generation: GenerationConfig, prompts: list[PromptRecord],
               counts: list[int], seeds: list[int], done: Mapping[tuple[int, int], Completion],
               on_finish: OnFinish) -> list[list[Completion]]: ...


class TeacherFailed(UserError, RuntimeError):
    """The teacher's server gave no usable answer; the samples finished before are journaled."""


@dataclasses.dataclass
class LocalTeacher:
    """A model loaded beside the policy, sampled with raftlm's sampler."""

    name: str
    model: Any
    tokenizer: Any  # the policy's (the teacher's is checked equal at load)
    config: TeacherConfig

    def sample(self, generation: GenerationConfig, prompts: list[PromptRecord],
               counts: list[int], seeds: list[int], done: Mapping[tuple[int, int], Completion],
               on_finish: OnFinish) -> list[list[Completion]]:
        # raftlm's sampler whatever generation.backend: its samples depend on (seed, index)
        generation = dataclasses.replace(generation, backend="raftlm", teacher=None,
                                         temperature=_temperature(self.config, generation))
        return generate(self.model, self.tokenizer, [p.token_ids for p in prompts], counts,
                        generation, seeds=seeds, desc="teacher", done=done,
                        on_finish=on_finish)


class EndpointTeacher:
    """A model behind an OpenAI-compatible chat-completions API."""

    def __init__(self, config: TeacherConfig, tokenizer: Any, system_prompt: str | None):
        self.name, self.config = config.model, config
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def sample(self, generation: GenerationConfig, prompts: list[PromptRecord],
               counts: list[int], seeds: list[int], done: Mapping[tuple[int, int], Completion],
               on_finish: OnFinish) -> list[list[Completion]]:
        rows: list[list[Any]] = [[done.get((i, j)) for j in range(n)]
                                 for i, n in enumerate(counts)]
        todo = [(i, j) for i, row in enumerate(rows) for j, c in enumerate(row) if c is None]
        if todo:
            asyncio.run(self._ask(generation, prompts, seeds, todo, rows, on_finish))
        return rows

    async def _ask(self, generation: GenerationConfig, prompts: list[PromptRecord],
                   seeds: list[int], todo: list[tuple[int, int]], rows: list[list[Any]],
                   on_finish: OnFinish) -> None:
        endpoint = Endpoint(self.url, self.config.timeout_s, self.config.timeout_s, self.headers)
        limit = asyncio.Semaphore(self.config.concurrency)

        async def one(i: int, j: int) -> None:
            request = {
                "model": self.config.model, "messages": self.messages(prompts[i].prompt),
                "max_tokens": generation.max_new_tokens, "temperature": _temperature(
                    self.config, generation), "top_p": generation.top_p,
                "seed": sample_seed(seeds[i], j), "n": 1,
                **({"stop": generation.stop_strings} if generation.stop_strings else {}),
            }
            async with limit:
                answer = await endpoint.post(client, request)
            rows[i][j] = self.completion(answer, generation.max_new_tokens)
            on_finish(i, j, rows[i][j])

        async with endpoint.client(self.config.concurrency) as client:
            outcomes = await asyncio.gather(*(one(i, j) for i, j in todo),
                                            return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            first = next((o for o in failed if not getattr(o, "follow_on", False)), failed[0])
            if not isinstance(first, (RequestFailed, ValueError)):
                raise first
            raise TeacherFailed(f"generation.teacher: {first} ({len(failed)} of {len(todo)} "
                                "samples failed; resume reuses the others)")

    def messages(self, prompt: str | list[dict]) -> list[dict]:
        """The prompt as chat messages, behind the run's system prompt (as the policy sees
        it: `data.system_prompt`)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def completion(self, answer: Any, limit: int) -> Completion:
        """The answer as the policy's tokens: its text tokenized, cut at `limit` tokens
        (max_new_tokens), ending with eos when the server stopped on its own."""
        ids = self.tokenizer(answer_text(answer, self.url), add_special_tokens=False)["input_ids"]
        stopped = answer["choices"][0].get("finish_reason") == "stop"
        if stopped and len(ids) < limit and self.tokenizer.eos_token_id is not None:
            ids, reason = [*ids, self.tokenizer.eos_token_id], "eos"
        else:
            ids, reason = ids[:limit], "length"
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, reason)


def build_teacher(config: RaftConfig, tokenizer: Any, device: torch.device, dtype: torch.dtype
                  ) -> Teacher | None:
    """The configured teacher (None without `generation.teacher`); a local one is loaded now."""
    teacher = config.generation.teacher
    if teacher is None:
        return None
    if teacher.base_url:
        return EndpointTeacher(teacher, tokenizer, config.data.system_prompt)
    model_config = dataclasses.replace(
        config.model, path=teacher.model, gguf_file=teacher.gguf_file,
        gradient_checkpointing=False, lora=dataclasses.replace(config.model.lora, enabled=False))
    model, own_tokenizer = load_policy(model_config, device, dtype)
    if own_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"generation.teacher.model: {teacher.model}'s tokenizer is not the "
                          "policy's (its token ids would be trained on as other words); serve "
                          "it and set generation.teacher.base_url instead")
    return LocalTeacher(teacher.model, model.eval(), tokenizer, teacher)


def check_teacher(config: RaftConfig) -> None:
    """Settings the teacher needs from other sections; raises ConfigError naming the field."""
    backend = config.generation.backend
    if config.generation.teacher is not None and not GENERATION_BACKENDS[backend].keeps_done:
        raise ConfigError(
            f"generation.teacher: expected a generation.backend whose samples depend on (seed, "
            f"index) alone (raftlm), so that the teacher's share keeps its places in each "
            f"prompt's K, got {backend}")


def teacher_seeds(run_seed: int, stage: int, prompt_ids: list[int]) -> list[int]:
    """One seed per prompt for the teacher's samples, apart from the policy's
    (`sample_seeds`: the same numbers without the fourth)."""
    return [int(np.random.SeedSequence([run_seed, stage, pid, 1]).generate_state(1, np.uint64)[0]
                >> 1) for pid in prompt_ids]


def sample_seed(prompt_seed: int, index: int) -> int:
    """A server request's seed for sample `index` of a prompt (OpenAI's seed: < 2**63)."""
    return int(np.random.SeedSequence([prompt_seed, index]).generate_state(1, np.uint64)[0] >> 1)


def _temperature(teacher: TeacherConfig, generation: GenerationConfig) -> float:
    return generation.temperature if teacher.temperature is None else teacher.temperature
