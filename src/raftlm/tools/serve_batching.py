"""Dynamic batching for `raftlm serve`: concurrent requests share one sampler call.

One thread owns the model. Requests queue while it samples; when the call ends it takes every
queued request and samples them together, one `generate` call per sampling setting (requests
with equal temperature, top_p, max_tokens and stop strings share a call; a judge or an
evaluation harness sends equal ones). Each request keeps its own seed, and raftlm's sampler
draws a sample from (seed, sample index, step) alone, so a seeded request gets the same answer
whether it was batched or alone (in fp32; see `raftlm.sampling.fast`).

Requests do not join a call already running (true continuous batching): the sampler's call
owns a fixed set of prompts and sizes its KV cache for them; a request arriving mid-call waits
at most one call.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate, sample_seeds
from raftlm.tools.serve_api import ChatRequest

OnToken = Callable[[int, list[int]], None]  # (choice index, its token ids so far)


@dataclass
class Job:
    """One request waiting for the sampler."""

    request: ChatRequest
    prompt_ids: list[int]
    on_token: OnToken | None = None  # streamed requests: called from the sampler's thread
    result: Future = field(default_factory=Future)  # its completions, or the sampler's error


def request_seed(seed: int | None) -> int:
    """The sampler seed of a request: from its `seed` (reproducible), else fresh randomness,
    so repeated identical requests give independent samples (best-of-n, pass@k)."""
    if seed is None:
        return secrets.randbits(62)
    return sample_seeds(seed % 2**64, 0, [0])[0]


class Batcher:
    """The thread that samples every queued request, batched (see the module docstring)."""

    def __init__(self, target: Any, max_requests: int = 256):
        self.target, self.max_requests = target, max_requests
        self.queue: list[Job] = []
        self.changed = threading.Condition()
        self.closed = False
        self.calls = 0  # sampler calls made (the tests check requests shared them)
        self.thread: threading.Thread | None = None

    def submit(self, job: Job) -> Future:
        """Queue `job`; its `result` resolves once sampled."""
        with self.changed:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="raftlm-sampler",
                                               daemon=True)
                self.thread.start()
            self.queue.append(job)
            self.changed.notify()
        return job.result

    def close(self) -> None:
        """Stop after the call in progress; requests still queued fail."""
        with self.changed:
            self.closed = True
            self.changed.notify()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        while True:
            with self.changed:
                while not self.queue and not self.closed:
                    self.changed.wait()
                if self.closed:
                    for job in self.queue:
                        job.result.set_exception(RuntimeError("the server is shutting down"))
                    return
                jobs, self.queue = (self.queue[: self.max_requests],
                                    self.queue[self.max_requests:])
            groups: dict[tuple[Any, ...], list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.request.sampling_key(), []).append(job)
            for group in groups.values():
                self._sample(group)

    def _sample(self, jobs: list[Job]) -> None:
        """One sampler call for requests of one sampling setting."""
        first = jobs[0].request
        defaults = self.target.config.generation
        settings = dataclasses.replace(
            defaults, max_new_tokens=first.max_tokens or defaults.max_new_tokens,
            temperature=first.temperature or 1.0, top_p=first.top_p, top_k=0,
            stop_strings=list(first.stop))
        streamed = {i: job.on_token for i, job in enumerate(jobs) if job.on_token is not None}
        on_token = None
        if streamed:
            def on_token(i: int, j: int, ids: list[int]) -> None:
                if i in streamed:
                    streamed[i](j, list(ids))  # a copy: the sampler appends to its list
        try:
            self.calls += 1
            rows: list[list[Completion]] = generate(
                self.target.model, self.target.tokenizer, [job.prompt_ids for job in jobs],
                [job.request.n for job in jobs], settings,
                seeds=[request_seed(job.request.seed) for job in jobs],
                greedy=first.temperature == 0, desc="serve", on_token=on_token)
        except Exception as err:  # the clients get a 500 each; the server goes on
            for job in jobs:
                job.result.set_exception(err)
            return
        for job, completions in zip(jobs, rows, strict=True):
            job.result.set_result(completions)
