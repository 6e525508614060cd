"""unisd.data.prompts: message builders per task kind, the exact teacher prompt, and rendering with a tiny
tokenizer built here (one with a chat template, one without)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from unisd.data import prompts as P
from unisd.data.benchmarks import BENCHMARKS, render_tool_calls, resolve_data_dir
from unisd.data.records import Record

MC = Record(
    id="cqa/x",
    benchmark="commonsenseqa",
    split="train",
    question="Where do fish live?",
    reference="Reasoning: Fish need water.\nAnswer: B",
    answer="B",
    choices=["sky", "sea", "desk"],
)
MBPP = Record(
    id="mbpp/601",
    benchmark="mbpp",
    split="train",
    question="Write a function to add two numbers.\nYour code should pass these tests:\n\nassert add(1, 2) == 3",
    reference="def add(a, b):\n    return a + b",
    answer="def add(a, b):\n    return a + b",
    tests=["assert add(1, 2) == 3"],
    entry_point="add",
)
HUMANEVAL = Record(
    id="HumanEval/0",
    benchmark="humaneval",
    split="test",
    question='\ndef inc(x):\n    """Add one."""\n',
    reference='\ndef inc(x):\n    """Add one."""\n    return x + 1\n',
    answer='\ndef inc(x):\n    """Add one."""\n    return x + 1\n',
    tests=["def check(candidate):\n    assert candidate(1) == 2\n"],
    entry_point="inc",
    meta={"prompt": '\ndef inc(x):\n    """Add one."""\n'},
)
CALLS = [{"name": "hi", "arguments": {"to": "Bo"}, "arguments_raw": '{"to": "Bo"}'}]
TOOL = Record(
    id="toolalpaca/eval_real/Demo/0",
    benchmark="toolalpaca",
    split="train",
    question="API: Demo\nTools:\nhi: Say hi.\nParameters: {}\n\nUser request: Say hi to Bo.",
    reference=render_tool_calls(CALLS),
    answer=render_tool_calls(CALLS),
    gold_calls=CALLS,
    meta={"api_name": "Demo", "instruction": "Say hi to Bo."},
)

SD_TAIL = "Carefully study the reference solution, then solve the problem below with your own approach."


# --------------------------------------------------------------------------------------------------
# Student prompts


def test_multiple_choice_student_prompt():
    (msg,) = P.student_messages(MC)
    assert msg["role"] == "user"
    text = msg["content"]
    assert text.startswith("Question: Where do fish live?\n\nChoices:\n(A) sky\n(B) sea\n(C) desk\n\n")
    assert '"Answer: X", where X is A, B or C' in text
    assert text.endswith("Reasoning: <a few short sentences>\nAnswer: <letter>")


def test_code_student_prompts_ask_for_one_python_block_defining_the_entry_point():
    mbpp = P.student_messages(MBPP)[0]["content"]
    assert mbpp.startswith(MBPP.question + "\n\n")
    assert "named `add`" in mbpp and "single ```python code block" in mbpp
    humaneval = P.student_messages(HUMANEVAL)[0]["content"]
    assert humaneval.startswith(
        'Complete the following Python function.\n\n```python\ndef inc(x):\n    """Add one."""\n```'
    )
    assert "named `inc`" in humaneval and "signature, docstring and body" in humaneval


def test_tool_use_student_prompt_uses_react_format():
    text = P.student_messages(TOOL)[0]["content"]
    assert text.startswith(TOOL.question + "\n\n")
    assert text.endswith("Action: <tool name>\nAction Input: <the arguments as a JSON object>")


def test_system_message_is_optional_and_first():
    assert [m["role"] for m in P.student_messages(MC)] == ["user"]
    messages = P.student_messages(MC, system="Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."} and messages[1]["role"] == "user"


def test_code_record_without_entry_point_is_an_error():
    broken = Record(**{**MBPP.to_dict(), "entry_point": None})
    with pytest.raises(ValueError, match="mbpp/601: a code record needs entry_point"):
        P.student_messages(broken)


# --------------------------------------------------------------------------------------------------
# Teacher, negative and auxiliary-context prompts


@pytest.mark.parametrize("record", [MC, MBPP, HUMANEVAL, TOOL], ids=lambda r: r.benchmark)
def test_teacher_prompt_is_exactly_the_algorithm_template(record):
    x = P.student_messages(record)[0]["content"]
    (msg,) = P.teacher_messages(record)
    reference = record.reference.strip("\n")
    assert msg == {
        "role": "user",
        "content": f"{x}\n\nThis is an example for a response to the question:\n{reference}\n\n{SD_TAIL}",
    }


def test_teacher_reference_override_and_empty_reference():
    content = P.teacher_messages(MC, reference="Answer: C")[0]["content"]
    assert "question:\nAnswer: C\n\nCarefully" in content and "Fish need water" not in content
    with pytest.raises(ValueError, match="non-empty reference"):
        P.teacher_messages(MC, reference="  ")


def test_negative_prompt_differs_from_teacher_only_in_the_demonstration():
    wrong = "Reasoning: Fish fly.\nAnswer: A"
    negative = P.negative_messages(MC, wrong)[0]["content"]
    assert negative == P.teacher_messages(MC, reference=wrong)[0]["content"]
    assert negative.replace(wrong, MC.reference) == P.teacher_messages(MC)[0]["content"]
    with pytest.raises(ValueError, match="negative demonstration is empty"):
        P.negative_messages(MC, "")


def test_context_prompt_examples_puts_headers_then_the_task():
    donor = Record(**{**MC.to_dict(), "id": "cqa/y", "question": "What is ice?", "reference": "Answer: A"})
    example = P.solved_example(donor, 1)
    assert example.startswith("### [REFERENCE ONLY #1]\nReference Task:\nQuestion: What is ice?")
    assert example.endswith("Reference Response:\nAnswer: A")
    content = P.context_messages(MC, example)[0]["content"]
    samples = content.index("## Reference Samples (DO NOT SOLVE THESE)")
    task = content.index("## Task to Solve (ONLY ANSWER THIS TASK)")
    assert samples == 0 and samples < content.index(example) < task
    assert content.endswith(P.student_messages(MC)[0]["content"])
    assert MC.reference not in content, "an auxiliary context never holds this item's gold answer"


def test_context_prompt_instruction_kind_and_errors():
    content = P.context_messages(MC, "Think about habitats.", kind="instruction")[0]["content"]
    assert content.startswith("## General Instruction for Your Answer\nThink about habitats.\n\n")
    with pytest.raises(ValueError, match="auxiliary context is empty"):
        P.context_messages(MC, "")
    with pytest.raises(ValueError, match="unknown context kind"):
        P.context_messages(MC, "x", kind="other")  # type: ignore[arg-type]


def test_tool_use_solved_example_leaves_out_the_documentation():
    example = P.solved_example(TOOL)
    assert "User request: Say hi to Bo." in example and "Parameters" not in example
    assert example.endswith(TOOL.reference)


# --------------------------------------------------------------------------------------------------
# Rendering with tiny tokenizers

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _tiny_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    words = "Question : Where do fish live ? Choices ( A ) B C sky sea desk Answer Be brief .".split()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[2:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    return tokenizer


def test_render_prompt_uses_the_chat_template_when_there_is_one():
    tok = _tiny_tokenizer(chat=True)
    messages = P.student_messages(MC, system="Be brief.")
    expected = f"<s><|system|>\nBe brief.<|end|>\n<|user|>\n{messages[1]['content']}<|end|>\n<|assistant|>\n"
    assert P.render_prompt(tok, messages) == expected
    assert P.render_prompt(tok, messages, chat=True) == expected
    assert P.render_prompt(tok, messages, chat=False) == f"Be brief.\n\n{messages[1]['content']}\n\nAnswer:"


def test_render_prompt_plain_for_base_models():
    tok = _tiny_tokenizer(chat=False)
    messages = P.student_messages(MC)
    assert P.render_prompt(tok, messages) == messages[0]["content"] + "\n\nAnswer:"
    with pytest.raises(ValueError, match="no chat_template"):
        P.render_prompt(tok, messages, chat=True)
    with pytest.raises(ValueError, match="supports system/user"):
        P.render_prompt(tok, messages + [{"role": "assistant", "content": "B"}])
    with pytest.raises(ValueError, match="messages is empty"):
        P.render_prompt(tok, [])


def test_encode_prompt_adds_bos_exactly_once():
    chat_tok, plain_tok = _tiny_tokenizer(chat=True), _tiny_tokenizer(chat=False)
    bos = chat_tok.convert_tokens_to_ids("<s>")
    messages = P.student_messages(MC)
    chat_ids = P.encode_prompt(chat_tok, messages)
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1, "the template's BOS, not a second one"
    assert chat_ids[1] == chat_tok.convert_tokens_to_ids("<|user|>")
    assert chat_ids[-1] == chat_tok.convert_tokens_to_ids("<|assistant|>")
    assert chat_ids == chat_tok(P.render_prompt(chat_tok, messages), add_special_tokens=False)["input_ids"]
    plain_ids = P.encode_prompt(plain_tok, messages)
    assert plain_ids[0] == bos and plain_ids.count(bos) == 1
    assert plain_tok.convert_ids_to_tokens(plain_ids[-2:]) == ["Answer", ":"]
    assert all(isinstance(i, int) for i in chat_ids + plain_ids)


# --------------------------------------------------------------------------------------------------
# Real records, when the data is here

try:
    resolve_data_dir()
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False


@pytest.mark.parametrize("name", BENCHMARKS)
def test_prompts_for_real_records(name):
    from unisd.data.benchmarks import load_benchmark

    if name != "humaneval" and not HAVE_DATA:
        pytest.skip("benchmark data not found: set UNISD_DATA_DIR or provide ../shared/data")
    tok = _tiny_tokenizer(chat=True)
    for record in load_benchmark(name, "train", limit=20):
        student = P.student_messages(record)[0]["content"]
        teacher = P.teacher_messages(record)[0]["content"]
        assert teacher.startswith(student) and teacher.endswith(SD_TAIL)
        assert record.reference.strip("\n") in teacher and record.reference.strip() not in student
        assert P.render_prompt(tok, P.teacher_messages(record)).endswith("<|assistant|>\n")
