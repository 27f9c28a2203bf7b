"""Continuous batching for `raftlm serve`: concurrent requests share the sampler's batch.

One thread owns the model and makes one `generate` call at a time, for requests of one sampling
setting (equal temperature, top_p, max_tokens and stop strings; a judge or an evaluation
harness sends equal ones). While the call runs, the sampler asks between decode steps for more
(`generate(more=...)`): queued requests of the same setting join it, their rows taking the
batch's free rows as other samples finish, and each request is answered as soon as its own
samples are done. Requests of another setting wait for the next call.

Each request keeps its own seed, and raftlm's sampler draws a sample from (seed, sample index,
step) alone, so a seeded request gets the same tokens whether it ran alone, batched, or joined
a running call (in fp32; see `raftlm.sampling.fast`). The `hf` and `vllm` backends never ask
for more: there requests queued during a call are sampled together in the next one.
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


@dataclass(eq=False)  # jobs are told apart by identity, not by their (equal) requests
class Job:
    """One request waiting for the sampler."""

    request: ChatRequest
    prompt_ids: list[int]
    on_token: OnToken | None = None  # streamed requests: called from the sampler's thread
    result: Future = field(default_factory=Future)  # its completions, or the sampler's error
    completions: dict[int, Completion] = field(default_factory=dict)  # finished samples


def request_seed(seed: int | None) -> int:
    """The sampler seed of a request: from its `seed` (reproducible), else fresh randomness,
    so repeated identical requests give independent samples (best-of-n, pass@k)."""
    if seed is None:
        return secrets.randbits(62)
    return sample_seeds(seed % 2**64, 0, [0])[0]


class Batcher:
    """The thread that samples every queued request, batched (see the module docstring)."""

    def __init__(self, target: Any, max_requests: int = 256):
        self.target = target
        self.max_requests = max_requests  # requests one call serves (1: one at a time)
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
                jobs = self._take(self.queue[0].request.sampling_key(), self.max_requests)
            self._sample(jobs)

    def _take(self, key: tuple[Any, ...], most: int) -> list[Job]:
        """Remove and return up to `most` queued jobs of sampling setting `key`, oldest first
        (the caller holds `changed`)."""
        taken = [job for job in self.queue if job.request.sampling_key() == key][:most]
        self.queue = [job for job in self.queue if job not in taken]
        return taken

    def _sample(self, jobs: list[Job]) -> None:
        """One sampler call for requests of one sampling setting, joined by those that queue
        while it runs."""
        first = jobs[0].request
        defaults = self.target.config.generation
        settings = dataclasses.replace(
            defaults, max_new_tokens=first.max_tokens or defaults.max_new_tokens,
            temperature=first.temperature or 1.0, top_p=first.top_p, top_k=0,
            stop_strings=list(first.stop))

        def more() -> list[tuple[list[int], int, int]]:
            with self.changed:
                room = max(0, self.max_requests - len(jobs))  # a call serves max_requests
                joining = self._take(first.sampling_key(), room)
            jobs.extend(joining)
            return [(job.prompt_ids, job.request.n, request_seed(job.request.seed))
                    for job in joining]

        def on_token(i: int, j: int, ids: list[int]) -> None:
            if jobs[i].on_token is not None:
                jobs[i].on_token(j, list(ids))  # a copy: the sampler appends to its list

        def on_finish(i: int, j: int, completion: Completion) -> None:
            job = jobs[i]
            job.completions[j] = completion
            if len(job.completions) == job.request.n:  # answered now, not at the call's end
                job.result.set_result([job.completions[k] for k in range(job.request.n)])

        try:
            self.calls += 1
            generate(self.target.model, self.target.tokenizer, [job.prompt_ids for job in jobs],
                     [job.request.n for job in jobs], settings,
                     seeds=[request_seed(job.request.seed) for job in jobs],
                     greedy=first.temperature == 0, desc="serve", on_token=on_token,
                     on_finish=on_finish, more=more)
        except Exception as err:  # the clients get a 500 each; the server goes on
            for job in jobs:
                if not job.result.done():
                    job.result.set_exception(err)
        for job in jobs:  # a backend that reported fewer samples than asked: say so
            if not job.result.done():
                job.result.set_exception(RuntimeError("the sampler returned no answer"))
