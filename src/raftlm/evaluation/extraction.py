"""Answer extraction: which answer a response gives, and whether it is the reference's.

Named per evaluation set (`evaluation.extraction`, `evaluation.sets[].extraction`), because the
rule moves published numbers more than most training changes do (GSM8K: 1.7% strict vs 38.3%
lenient for one model). Every answer is compared as a canonical number string: thousands commas,
a leading "$" and a trailing period dropped, the value written without exponent or trailing
zeros ("1,234.50" -> "1234.5", "-3.0" -> "-3").

- `strict`: the task's own format. The number after the last "####" (GSM8K's), else after the
  last "the answer is" ("The final answer is: $18." -> "18"; markdown bold allowed). A response
  that does neither has no answer.
- `lenient`: the last number anywhere in the response; the rule of the `numeric_answer` reward,
  so the default set's `eval/accuracy` means what it always did.
- `math_verify`: math-verify's parse and equivalence (`pip install raftlm[math]`; refused in one
  line where it is not installed; never needed by the other two).
- `reward`: no extraction; a response is correct when the set's reward reaches
  `evaluation.correct_reward` (a task whose answers only the user's reward can judge).
- `auto` (the default): what the run's reward says. A built-in verifiable term decides
  (`numeric_answer` -> lenient, `math_answer` -> math_verify); else references that are all
  numbers -> lenient; else no accuracy at all (say `reward` or a rule to get one): a word answer
  is never pushed through a number check.

The reference answer is parsed one documented way for every rule (`parse_reference`): the text
after its last "####" if it has one (GSM8K's solutions), else the whole text; that text as a
canonical number when it is one, else stripped of surrounding spaces (a word answer such as
"Budapest" then never equals a number: accuracy 0, not a crash).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from raftlm.errors import InvalidInput
from raftlm.rewards.verifiable import BUILTIN_REWARDS, NUMBER, math_answer, numeric_answer

# A number: "1,234.5" (thousands groups) or "-12.5"; never the "-" of "10-5" nor the "5" of ".5".
_NUMBER = re.compile(NUMBER)
_AFTER_HASHES = re.compile(r"####\s*\**\s*\$?\s*(" + NUMBER + ")")
_ANSWER_IS = re.compile(r"(?i)answer\s+is\s*:?\s*\**\s*\$?\s*(" + NUMBER + ")")
_WHOLE_NUMBER = re.compile(r"\s*\$?\s*(" + NUMBER + r")\s*\.?\s*")


def canonical_number(text: str) -> str | None:
    """"1,234.50" -> "1234.5", "-3.0" -> "-3"; None when `text` is not a number."""
    if not _NUMBER.fullmatch(text.strip()):  # Decimal would also take "NaN" and "1e3"
        return None
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def strict_answer(text: str) -> str | None:
    """The number after the last "####", else after the last "the answer is"; else None."""
    for pattern in (_AFTER_HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return canonical_number(found[-1])
    return None


def lenient_answer(text: str) -> str | None:
    """The last number in `text`, or None."""
    found = _NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


def parse_reference(reference: object) -> str:
    """The reference answer as every rule compares it (see the module docstring)."""
    text = str(reference)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    whole = _WHOLE_NUMBER.fullmatch(text)
    number = canonical_number(whole.group(1)) if whole else None
    return number if number is not None else text.strip()


@dataclass(frozen=True)
class Extraction:
    """One rule: `check(response, reference)` -> (the response's answer or None, correct);
    None where the rule reads no text (`reward`, or `auto`, which stands for another rule)."""

    name: str
    check: Callable[[str, object], tuple[str | None, bool]] | None
    requires: str | None = None  # the optional module it needs
    uses_reward: bool = False  # correct = the reward reaches evaluation.correct_reward
    chosen_per_set: bool = False  # auto: resolved by `resolve` from the reward and references


def _by_answer(extract: Callable[[str], str | None]
               ) -> Callable[[str, object], tuple[str | None, bool]]:
    def check(response: str, reference: object) -> tuple[str | None, bool]:
        answer = extract(response)
        return answer, answer is not None and answer == parse_reference(reference)
    return check


def _math_verify(response: str, reference: object) -> tuple[str | None, bool]:
    from math_verify import parse, verify  # optional dependency (raftlm[math])

    # math_verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(parse_reference(reference), parsing_timeout=timeout)
    pred = parse(response, parsing_timeout=timeout)
    answer = str(pred[-1]) if pred else None
    return answer, bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))


EXTRACTIONS: dict[str, Extraction] = {
    "strict": Extraction("strict", _by_answer(strict_answer)),
    "lenient": Extraction("lenient", _by_answer(lenient_answer)),
    "math_verify": Extraction("math_verify", _math_verify, requires="math_verify"),
    "reward": Extraction("reward", None, uses_reward=True),
    "auto": Extraction("auto", None, chosen_per_set=True),
}
# What `auto` takes for a run rewarded by a built-in verifiable function: that function's rule.
RULE_OF_BUILTIN_REWARD = {numeric_answer: "lenient", math_answer: "math_verify"}


def extraction(name: str, where: str) -> Extraction:
    """The rule called `name`, its optional dependency checked; one-line errors name `where`."""
    if name not in EXTRACTIONS:
        raise InvalidInput(f"{where}: unknown extraction {name!r}; known: "
                           f"{', '.join(EXTRACTIONS)}")
    rule = EXTRACTIONS[name]
    if rule.requires:
        import importlib.util

        if importlib.util.find_spec(rule.requires) is None:
            raise InvalidInput(f"{where}: extraction {name!r} needs {rule.requires} "
                               "(pip install 'raftlm[math]'); strict and lenient need nothing")
    return rule


def is_number(reference: object) -> bool:
    """Whether the reference parses as a number (see `parse_reference`)."""
    return canonical_number(parse_reference(reference)) is not None


def resolve(names: list[str], reward_names: list[str], references: list[object] | None,
            where: str) -> list[Extraction]:
    """The rules a set is scored by, `auto` replaced (see the module docstring; it may drop
    out: then the set has no accuracy). `reward_names` are the run's reward terms' names,
    `references` the set's `answer` column (None: it has none, so only `reward` can judge)."""
    rules = []
    for name in names:
        rule = extraction(name, where)
        if rule.chosen_per_set:
            rule = _auto(reward_names, references, where)
        if rule is None or rule in rules:
            continue
        if rule.check is not None and references is None:
            raise InvalidInput(f"{where}: extraction {rule.name!r} compares with an `answer` "
                               "column, which this set has not")
        rules.append(rule)
    return rules


def _auto(reward_names: list[str], references: list[object] | None, where: str
          ) -> Extraction | None:
    if references is None:
        return None
    for name in reward_names:
        rule = RULE_OF_BUILTIN_REWARD.get(BUILTIN_REWARDS.get(name))
        if rule is not None:
            return extraction(rule, where)
    return EXTRACTIONS["lenient"] if all(map(is_number, references)) else None
