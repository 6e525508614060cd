"""Answer extraction: multiple-choice letters, code from chat replies, tool calls."""

from __future__ import annotations

import pytest

from unisd.extract import extract_choice_letter, extract_code, parse_tool_calls

# --------------------------------------------------------------------------------------------------
# multiple choice


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (X).".replace("X", "B"), "B"),
        ("Reasoning...\nThe correct answer is C", "C"),
        ("Answer: D", "D"),
        ("answer: (a)", "A"),
        ("So the answer is (c).", "C"),
        ("Let me think.\nB\n", "B"),
        ("(C)", "C"),
        ("I pick **B** here.", "B"),
        ("**Answer:** C", "C"),
        ("The answer is option C, since option A is wrong.", "C"),
        ("The correct option is D.", "D"),
        ("$\\boxed{B}$", "B"),
        ("C. Paris is the capital.", "C"),
        ("The answer is: B) Paris", "B"),
        ("The answer is [A]", "A"),
        ("answer is d.", "D"),
    ],
)
def test_choice_letter_formats(text, expected):
    assert extract_choice_letter(text, 4) == expected


def test_last_answer_statement_wins():
    text = "The answer is (A)... wait, I misread. Actually the answer is (C)."
    assert extract_choice_letter(text, 4) == "C"


def test_answer_statement_beats_weaker_evidence_later():
    # a stray bold letter or an option line after the answer must not override it
    text = "The answer is B.\n\n**A** is tempting, but\nA\nis wrong."
    assert extract_choice_letter(text, 4) == "B"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I am not sure.",
        "the answer is a bird",  # lower-case article, not an option
        "I think it is B because of X",  # no answer statement, no bare letter
        "Answer Choices:\n(a) cat\n(b) dog",  # options restated, nothing chosen
        "The answer is 42",
        "The answer is (E)",  # out of range for 4 choices
    ],
)
def test_unparseable_is_none(text):
    assert extract_choice_letter(text, 4) is None


def test_num_choices_bounds_letters():
    assert extract_choice_letter("The answer is E", 5) == "E"
    assert extract_choice_letter("The answer is E", 4) is None
    assert extract_choice_letter("Answer: B", 2) == "B"
    with pytest.raises(ValueError, match="num_choices"):
        extract_choice_letter("A", 0)


# --------------------------------------------------------------------------------------------------
# code


def test_python_fence_with_prose():
    text = "Sure! Here is the code:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds two numbers."
    assert extract_code(text) == "def add(a, b):\n    return a + b\n"


def test_picks_block_defining_entry_point():
    text = (
        "```python\nprint(add(1, 2))\n```\n"
        "and the implementation:\n```py\nimport math\n\ndef add(a, b):\n    return a + b\n```\n"
        "```python\nassert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 0) == 0\n```"
    )
    assert extract_code(text, entry_point="add") == "import math\n\ndef add(a, b):\n    return a + b\n"
    # without an entry point: the longest python block
    assert extract_code(text).startswith("import math")


def test_non_python_blocks_are_second_choice():
    text = "```bash\npip install numpy && echo a very long shell line indeed\n```\n```\ndef f():\n    return 1\n```"
    assert extract_code(text) == "def f():\n    return 1\n"


def test_unterminated_fence_runs_to_end():
    text = "```python\ndef f(x):\n    return x * 2\n"
    assert extract_code(text) == "def f(x):\n    return x * 2\n"


def test_begin_done():
    text = "[BEGIN]\ndef f(x):\n    return x\n[DONE]\nextra text"
    assert extract_code(text) == "def f(x):\n    return x\n"
    assert extract_code("[BEGIN]\ndef g():\n    pass\n") == "def g():\n    pass\n"
    fenced = "[BEGIN]\n```python\ndef h():\n    return 3\n```\n[DONE]"
    assert extract_code(fenced) == "def h():\n    return 3\n"


def test_bare_code_with_leading_and_trailing_prose():
    text = "Here is my solution.\n\ndef f(x):\n    return x + 1\n\nThis returns x plus one."
    assert extract_code(text) == "def f(x):\n    return x + 1\n"


def test_function_body_continuation_is_kept_indented():
    body = "    return sorted(set(l))\n"
    assert extract_code(body) == body
    fenced_body = "```python\n    if not l:\n        return 0\n    return max(l)\n```"
    assert extract_code(fenced_body) == "    if not l:\n        return 0\n    return max(l)\n"


def test_uniformly_indented_module_is_dedented():
    text = "```python\n    def f():\n        return 1\n```"
    assert extract_code(text) == "def f():\n    return 1\n"


def test_plain_prose_is_returned_for_the_sandbox_to_reject():
    assert extract_code("I cannot solve this.") == "I cannot solve this.\n"
    assert extract_code("") == ""


# --------------------------------------------------------------------------------------------------
# tool calls


def test_react_multiple_steps():
    text = (
        "Thought: I need to search first.\n"
        "Action: searchAnime\n"
        'Action Input: {"query": "Naruto", "page": 1}\n'
        "Observation: ...\n"
        "Thought: now details\n"
        "Action: getAnimeDetails\n"
        'Action Input: {"animeId": 20,\n  "fields": ["title", "episodes"]}\n'
        "Final Answer: done"
    )
    calls = parse_tool_calls(text)
    assert [c["name"] for c in calls] == ["searchAnime", "getAnimeDetails"]
    assert calls[0]["arguments"] == {"query": "Naruto", "page": 1}
    assert calls[1]["arguments"] == {"animeId": 20, "fields": ["title", "episodes"]}


def test_react_non_json_input_keeps_raw():
    calls = parse_tool_calls("Action: getWeather\nAction Input: city=Paris\n")
    assert calls == [{"name": "getWeather", "arguments": None, "arguments_raw": "city=Paris"}]
    single_quoted = parse_tool_calls("Action: f\nAction Input: {'a': 1}")
    assert single_quoted[0]["arguments"] == {"a": 1}
    empty = parse_tool_calls("Action: getRandomImage\nAction Input: {}")
    assert empty[0]["arguments"] == {}


def test_json_function_call_list_and_variants():
    listed = '```json\n[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "parameters": {"y": "z"}}]\n```'
    assert [(c["name"], c["arguments"]) for c in parse_tool_calls(listed)] == [
        ("f", {"x": 1}),
        ("g", {"y": "z"}),
    ]
    openai = '{"tool_calls": [{"function": {"name": "h", "arguments": "{\\"q\\": \\"a\\"}"}}]}'
    assert [(c["name"], c["arguments"]) for c in parse_tool_calls(openai)] == [("h", {"q": "a"})]
    tagged = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"k": 2}}</tool_call>'
    assert [(c["name"], c["arguments"]) for c in parse_tool_calls(tagged)] == [("a", {}), ("b", {"k": 2})]


def test_no_calls():
    assert parse_tool_calls("I will just answer: 42.") == []
    assert parse_tool_calls('{"not": "a call"}') == []
    assert parse_tool_calls("") == []
