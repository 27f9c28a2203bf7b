"""Answer extraction per evaluation set: strict (the task's format), lenient (last number),
and the reference parsed one documented way (tricky cases)."""

import pytest

from raftlm.errors import UserError
from raftlm.evaluation.extraction import (
    EXTRACTIONS,
    canonical_number,
    extraction,
    lenient_answer,
    parse_reference,
    strict_answer,
)


@pytest.mark.parametrize("text, expected", [
    ("1,234", "1234"), ("1,234.50", "1234.5"), ("-3.0", "-3"), ("0.25", "0.25"),
    ("007", "7"), ("1,00", None), ("NaN", None), ("1e3", None), ("abc", None),
])
def test_canonical_number_drops_commas_and_trailing_zeros(text, expected):
    assert canonical_number(text) == expected


@pytest.mark.parametrize("response, expected", [
    ("She earns 9 * 2 = $18 a day.\n#### 18", "18"),
    ("#### $1,234.", "1234"),
    ("#### -5", "-5"),
    ("#### **42**", "42"),
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("The final answer is: $2.50.", "2.5"),
    ("The answer is **12** apples, not 13", "12"),
    ("#### 3 and then the answer is 4", "3"),  # "####" outranks "the answer is"
    ("#### 1\n#### 2", "2"),  # the last one
    ("It costs 18 dollars.", None),  # no format: strict finds nothing
])
def test_strict_takes_the_tasks_format_only(response, expected):
    assert strict_answer(response) == expected


@pytest.mark.parametrize("response, expected", [
    ("It costs $1,234.50.", "1234.5"),
    ("He is 10-5 = 5 years older", "5"),  # the "-" of a subtraction is no sign
    ("The temperature fell to -7.", "-7"),
    ("3 apples and 4 pears make 7", "7"),  # several numbers: the last
    ("0.5 of it, i.e. .5", "0.5"),  # ".5" is not read as 5
    ("no number here", None),
])
def test_lenient_takes_the_last_number(response, expected):
    assert lenient_answer(response) == expected


@pytest.mark.parametrize("reference, expected", [
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18", "18"),  # GSM8K solution
    ("#### 1,000", "1000"),
    ("42", "42"), (42, "42"), ("$5.", "5"), (" -2.50 ", "-2.5"),
    ("Budapest", "Budapest"), (" 42 apples ", "42 apples"),
])
def test_the_reference_is_parsed_one_documented_way(reference, expected):
    assert parse_reference(reference) == expected


def test_a_word_reference_is_wrong_never_an_error():
    for name in ("strict", "lenient"):
        assert EXTRACTIONS[name].check("The answer is 7", "Budapest") == ("7", False)


def test_strict_and_lenient_disagree_where_published_numbers_do():
    response, reference = "So she makes 18 dollars.", "#### 18"
    assert EXTRACTIONS["strict"].check(response, reference) == (None, False)
    assert EXTRACTIONS["lenient"].check(response, reference) == ("18", True)


def test_math_verify_is_equivalence_where_installed():
    pytest.importorskip("math_verify")
    answer, correct = extraction("math_verify", "x").check("so it is $\\frac{1}{2}$", "0.5")
    assert correct and answer


def test_an_unknown_extraction_is_one_line_naming_the_field():
    with pytest.raises(UserError, match=r"evaluation.sets\[1\].extraction: unknown extraction "
                                        r"'loose'; known: strict, lenient, math_verify"):
        extraction("loose", "evaluation.sets[1].extraction")
