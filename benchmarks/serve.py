"""`raftlm serve` throughput at 1, 4 and 16 concurrent clients, batched and one at a time.

A server process (`openai_app` on uvicorn, 127.0.0.1, a free port) serves a random model;
C client threads, each with the official `openai` client, send chat-completion requests
back to back (max_tokens 32, temperature 1, no seed) until --requests have been answered.
Reported: requests/s and completion tokens/s at each C, with continuous batching (requests
share the sampler's batch) and with one request per sampler call (the old behaviour).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve.py [--requests 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys
from raftlm.tools.serve import openai_app
from raftlm.tools.serve_reward import bind, serve_forever
from raftlm.tools.target import load_target
sock = bind("127.0.0.1", 0)
print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
serve_forever(openai_app(load_target(sys.argv[1]), "bench", int(sys.argv[2])), sock)
"""


def save_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama (the tests' character tokenizer and chat template) of the given size."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import TINY_VOCAB, tiny_llama_config, tiny_tokenizer
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(TINY_VOCAB, hidden_size=hidden, intermediate_size=hidden * 2,
                               num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@contextmanager
def server(model: Path, max_batch_requests: int) -> Iterator[str]:
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(model),
                                str(max_batch_requests)], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if not re.match(r"http://127\.0\.0\.1:\d+$", line.strip()):
            raise RuntimeError(f"the server did not start: {line!r}")
        yield line.strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


def throughput(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(requests/s, completion tokens/s) of `clients` threads sharing `requests` requests."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    left, tokens, lock = [requests], [0], threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            answer = client.chat.completions.create(
                model="bench", max_tokens=max_tokens, temperature=1.0,
                messages=[{"role": "user", "content": "Tell me a story."}])
            with lock:
                tokens[0] += answer.usage.completion_tokens

    client.chat.completions.create(model="bench", max_tokens=2,  # warm-up
                                   messages=[{"role": "user", "content": "Hi"}])
    threads = [threading.Thread(target=work) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return requests / seconds, tokens[0] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256, help="the random model's width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model(Path(tmp) / "model", args.hidden, args.layers)
        print(f"random Llama hidden {args.hidden}, {args.layers} layers; {args.requests} "
              f"requests of max_tokens {args.max_tokens}; median of {args.repeats}, the two "
              "servers measured in turn (other jobs on the machine shift both alike)")
        print(f"{'clients':>8}{'batched req/s':>15}{'tok/s':>8}{'one at a time req/s':>21}"
              f"{'tok/s':>8}")
        with server(model, 256) as batched, server(model, 1) as one_at_a_time:
            for clients in (1, 4, 16):
                rates: dict[str, list[tuple[float, float]]] = {batched: [], one_at_a_time: []}
                for _ in range(args.repeats):
                    for url in rates:
                        rates[url].append(throughput(url, clients, args.requests,
                                                     args.max_tokens))
                row = [statistics.median(r[k] for r in rates[url])
                       for url in (batched, one_at_a_time) for k in (0, 1)]
                print(f"{clients:>8}{row[0]:>15.1f}{row[1]:>8.0f}{row[2]:>21.1f}{row[3]:>8.0f}",
                      flush=True)

if __name__ == "__main__":
    main()
