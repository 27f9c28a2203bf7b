"""Output that is raftlm's own, and progress that fits where it goes.

In a terminal: tqdm bars. Anywhere else (CI, ``| tee``, a log file) carriage-return bars turn
into one long garbled line, so a plain line is printed every ``RAFTLM_PROGRESS_SECONDS``
(default 10) instead. ``set_quiet(True)`` (the CLI's ``--quiet``) silences both; the
one-line-per-stage summaries are ordinary prints and stay.

A command's output is raftlm's: libraries' progress bars (transformers' weight loading and
saving, the GGUF reader, datasets) are off, and the library warnings listed in
``HIDDEN_WARNINGS`` -- each by category and message, with why -- are hidden, unless
``--verbose``. Any other warning still shows.

Decoding bars (``decode_progress``) count tokens, not finished sequences: a batch's sequences
finish together, so a count of finished ones stays at 0 for minutes and then jumps, and its rate
and ETA are absurd until then ("1/200 seq [03:23<11:15:42]"). Each decoded token advances the bar
by 1/max_new_tokens of a sequence; a sequence that stops early adds the rest of its share when it
finishes. The rate and ETA are then right from the first update (the ETA assumes the sequences
left run to max_new_tokens: an upper bound).

Prompts are prefilled before their rows decode (`count_prefilled`): a batch of long prompts (a
5-shot GSM8K set in bf16) takes minutes before the first token. The bar then shows the prompt
tokens prefilled and their rate, and the decode rate counts decoding time only, so it reads
"0 tok/s" neither during that wait nor for minutes after it (`rate_postfix`).

In a log, a long bar's lines thin out: the next line comes after ``RAFTLM_PROGRESS_SECONDS`` or a
quarter of the time elapsed, whichever is longer (a 25-minute evaluation: ~20 lines, not 150).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm

from raftlm.errors import InvalidInput

DEFAULT_SECONDS = 10.0
PLAIN_FORMAT = "{desc}: {n:.0f}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
DECODE_FORMAT = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
THINNING = 0.25  # a plain line waits at least this fraction of the time elapsed

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar and progress line of this process."""
    global _quiet
    _quiet = quiet


# Library warnings a command hides unless --verbose: (category, message regex, why it is noise
# to a raftlm user). Matched from the message's start; a warning not listed here still shows.
HIDDEN_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft (0.21) reads transformers' old property name whenever it wraps a model in LoRA"),
]

def configure_output(quiet: bool = False, verbose: bool = False) -> None:
    """A command's output settings: progress ``quiet`` or not; unless ``verbose``, libraries'
    progress bars off and the library warnings listed above hidden."""
    set_quiet(quiet)
    if verbose:
        return
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # loading/saving bars, huggingface_hub's too
    for category, message, _ in HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def progress_seconds() -> float:
    """Seconds between plain progress lines (``RAFTLM_PROGRESS_SECONDS``)."""
    value = os.environ.get("RAFTLM_PROGRESS_SECONDS", "")
    try:
        seconds = float(value) if value else DEFAULT_SECONDS
    except ValueError:
        raise InvalidInput(f"RAFTLM_PROGRESS_SECONDS: expected seconds, got {value!r}") from None
    if seconds < 0:
        raise InvalidInput(f"RAFTLM_PROGRESS_SECONDS: expected >= 0, got {seconds}")
    return seconds


def progress(*, total: int | None, desc: str, unit: str = "it", disable: bool = False,
             file: Any = None, **options: Any) -> tqdm:
    """A progress bar: tqdm in a terminal, timed plain lines elsewhere, nothing when quiet.

    Accepts tqdm's keyword arguments; the object returned has tqdm's interface either way.
    """
    stream = file if file is not None else sys.stderr
    if _quiet or disable:
        return tqdm(total=total, desc=desc, unit=unit, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, **options)
    return PlainProgress(total=total, desc=desc, unit=unit, file=stream,
                         interval=progress_seconds())


def decode_progress(total: int, max_new_tokens: int, desc: str, file: Any = None) -> tqdm:
    """A bar of ``total`` sequences of at most ``max_new_tokens`` tokens each, advanced by
    `count_decoded` (each step's tokens) and `count_finished` (see the module's docstring)."""
    bar = progress(total=total, desc=desc, unit="seq", leave=False, file=file,
                   bar_format=DECODE_FORMAT)
    bar.token_budget = max(1, max_new_tokens)
    bar.tokens = 0
    bar.finished = 0
    bar.prefill_tokens = 0
    bar.prefill_seconds = 0.0
    return bar


def count_joined(bar: tqdm, sequences: int) -> None:
    """``sequences`` more joined the call (an agent's next turns): the bar's total grows, so it
    shows N/total, not N/? once the first call's count is passed."""
    if bar.total is not None:
        bar.total += sequences
        bar.refresh()


def count_prefilled(bar: tqdm, tokens: int, seconds: float) -> None:
    """``tokens`` prompt tokens were prefilled in ``seconds``; shown at once (within the bar's
    own pace), since the first batch's prefill can last minutes before any token is decoded."""
    if not hasattr(bar, "token_budget"):
        return
    bar.prefill_tokens += tokens
    bar.prefill_seconds += seconds
    _show_rate(bar)
    bar.refresh()


def count_decoded(bar: tqdm, tokens: int) -> None:
    """``tokens`` were decoded (one per running sequence of a step)."""
    if not hasattr(bar, "token_budget"):  # a plain bar of sequences: counts finished ones only
        return
    bar.tokens += tokens
    _show_rate(bar)
    bar.update(tokens / bar.token_budget)


def count_finished(bar: tqdm, sequences: int, tokens: int, decoded: bool = True) -> None:
    """``sequences`` finished with ``tokens`` tokens together; ``decoded=False`` where those
    tokens were not counted by `count_decoded` as they came (a backend that decodes a whole
    batch in one call)."""
    if not hasattr(bar, "token_budget"):
        bar.update(sequences)
        return
    if not decoded:
        bar.tokens += tokens
    bar.finished += sequences
    _show_rate(bar)
    bar.update(sequences - (tokens / bar.token_budget if decoded else 0))


def _show_rate(bar: tqdm) -> None:
    bar.set_postfix_str(rate_postfix(bar.finished, bar.tokens, bar.format_dict["elapsed"],
                                     bar.prefill_tokens, bar.prefill_seconds), refresh=False)


def rate_postfix(finished: int, tokens: int, elapsed: float, prefill_tokens: int = 0,
                 prefill_seconds: float = 0.0) -> str:
    """"12 done, 59.4 tok/s, prefill 8,960 tok at 1,210 tok/s": decoded tokens per second of
    decoding (the time spent prefilling taken out), and the prompt tokens prefilled so far."""
    parts = [f"{finished} done"]
    decoding = elapsed - prefill_seconds
    if tokens and decoding > 0:
        parts.append(f"{tokens / decoding:.1f} tok/s")
    if prefill_tokens and prefill_seconds > 0:
        parts.append(f"prefill {prefill_tokens:,} tok at {prefill_tokens / prefill_seconds:,.0f}"
                     " tok/s")
    return ", ".join(parts)


class PlainProgress(text_tqdm):
    """A tqdm whose display is a full line every ``interval`` seconds, never a ``\\r`` redraw.

    Bars that finish within one interval print nothing; one that printed also prints its
    final count when it closes.
    """

    def __init__(self, *, interval: float, **options: Any) -> None:
        self.interval = interval
        self.last_line_at: float | None = None
        self.lines_printed = 0
        super().__init__(mininterval=interval, bar_format=PLAIN_FORMAT, leave=False, **options)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        closing = msg == ""  # tqdm asks to clear a leave=False bar when it closes
        now = self._time()
        started = getattr(self, "start_t", now)
        since = self.last_line_at or started
        if closing:
            if not self.lines_printed:
                return False
        elif (self.n == 0 and not getattr(self, "prefill_tokens", 0)) or (
                now - since < max(self.interval, THINNING * (now - started))):
            return False
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self.last_line_at = now
        self.lines_printed += 1
        return False  # nothing to clear with a carriage return


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
