"""The report shows a multi-turn rollout as a card per turn: the model's turns, each tool's
result or error, the prefilled call opening marked as not the model's."""

from pathlib import Path

from raftlm.run.report import RunRecords, render_html, response_html

OPENING = '<tool_call>{"name": "calculator", "arguments": {"expression": "'
CALL = OPENING + '"expression": "12 * 34"}}</tool_call>'
TURNS = [{"role": "assistant", "content": CALL, "prefilled": OPENING, "finish_reason": "stop"},
         {"role": "tool", "name": "calculator", "content": "408", "error": None},
         {"role": "assistant", "content": "It is <408>.", "finish_reason": "eos"}]


def test_a_trajectory_is_shown_turn_by_turn_with_the_prefilled_opening_marked():
    page = response_html({"response": "whole text", "turns": TURNS})
    cards = page.split('<div class="turn ')[1:]
    assert [card.split('"')[0] for card in cards] == ["assistant", "tool", "assistant"]
    assert '<span class="role">tool calculator</span><pre>408</pre>' in cards[1]
    assert ('<span class="prefilled" title="prefilled (tool_choice): not the model\'s">'
            '&lt;tool_call&gt;{&quot;name&quot;') in cards[0]
    assert "It is &lt;408&gt;." in cards[2] and "whole text" not in page


def test_a_failed_call_says_its_error_kind():
    turns = [{"role": "assistant", "content": "<tool_call>{oops}</tool_call>"},
             {"role": "tool", "name": None, "content": "Error: could not read the tool call",
              "error": "parse"}]
    assert '<span class="role">tool (error: parse)</span>' in response_html({"turns": turns})


def test_a_single_turn_response_is_its_text():
    assert response_html({"response": "42"}) == '<pre class="response">42</pre>'


def test_the_reports_example_cards_hold_the_turns():
    row = {"prompt": "<|im_start|>user\nWhat is 12 * 34?<|im_end|>\n", "response": "...",
           "reward": 1.0, "turns": TURNS, "selected": True}
    run = RunRecords(Path("runs/x"), "", [{"stage": 0}, {"stage": 1}], {1: [row]}, {})
    page = render_html(run, {})
    assert "stage 1: all tied" in page and page.count('<div class="turn ') == 3
