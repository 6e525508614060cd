"""Pull the answer out of a model's free-form text — kept importable here; each extractor lives with its task
kind (`unisd.tasks`): a multiple-choice letter, a program, tool calls.

All three are pure functions of the text. They never guess: a letter that cannot be located with
confidence is None (scored as wrong and counted as unparseable), code falls back to the text itself
(the sandbox then reports the syntax error), and text without recognisable calls gives [].
"""

from unisd.tasks.code import extract_code
from unisd.tasks.multiple_choice import extract_choice_letter
from unisd.tasks.tool_use import parse_tool_calls

__all__ = ["extract_choice_letter", "extract_code", "parse_tool_calls"]
