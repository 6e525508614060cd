"""Prompt text per benchmark, and rendering to a model's input.

Message builders (plain data, `[{"role": ..., "content": ...}]`, an optional system message first):

    student_messages(record)                      x: the task plus the benchmark's answer-format instruction
    teacher_messages(record, reference=None)      x + the gold demonstration c* (ALGORITHM.md, verbatim)
    negative_messages(record, negative_text)      the same teacher prompt with a wrong demonstration c-
    context_messages(record, context_text)        an auxiliary context a_k prefixed to x
    solved_example(record, number=None)           one solved training item, as a_k's text is built from
    gold_completion(record)                       the gold answer in the student's answer format (SFT target)

Rendering:

    render_prompt(tokenizer, messages, chat=None) -> str
    encode_prompt(tokenizer, messages, chat=None) -> list[int]

Instruct models with a chat template get `apply_chat_template(..., add_generation_prompt=True)`. Base
models without one get plain text: the message contents joined by blank lines, then "\\n\\nAnswer:"
(`PLAIN_ANSWER_SUFFIX`). In plain mode the completion therefore starts *after* "Answer:"; an evaluator
extracting "Answer: X" should read `PLAIN_ANSWER_SUFFIX.strip() + completion`.
"""

from __future__ import annotations

from typing import Any, Literal

from unisd.data.records import Record

Message = dict[str, str]

SELF_DISTILLATION_INSTRUCTION = (
    "Carefully study the reference solution, then solve the problem below with your own approach."
)
# ALGORITHM.md: teacher prompt = x + the gold demonstration + the self-distillation instruction.
TEACHER_TEMPLATE = (
    "{x}\n\nThis is an example for a response to the question:\n{reference}\n\n"
    + SELF_DISTILLATION_INSTRUCTION
)
REFERENCE_SAMPLES_HEADER = "## Reference Samples (DO NOT SOLVE THESE)"
TASK_TO_SOLVE_HEADER = "## Task to Solve (ONLY ANSWER THIS TASK)"
GENERAL_INSTRUCTION_HEADER = "## General Instruction for Your Answer"
PLAIN_ANSWER_SUFFIX = "\n\nAnswer:"


# --------------------------------------------------------------------------------------------------
# Task text (what differs per task kind comes from its module in unisd.tasks)


def task_text(record: Record) -> str:
    """The problem statement alone, no answer-format instruction (the task kind's)."""
    from unisd import tasks

    return tasks.of(record).task_text(record)


def student_prompt(record: Record) -> str:
    """x: the student's user message content for this record."""
    from unisd import tasks

    kind = tasks.of(record)
    return f"{kind.task_text(record)}\n\n{kind.format_instruction(record)}"


def gold_completion(record: Record) -> str:
    """The gold answer written the way the student prompt asks for it (the SFT target)."""
    from unisd import tasks

    return tasks.of(record).gold_completion(record)


def teacher_prompt(record: Record, reference: str | None = None) -> str:
    """The teacher's user message: x plus a demonstration (default: the record's gold reference c*)."""
    reference = record.reference if reference is None else reference
    if not reference or not reference.strip():
        raise ValueError(f"{record.id}: the teacher prompt needs a non-empty reference demonstration")
    return TEACHER_TEMPLATE.format(x=student_prompt(record), reference=reference.strip("\n"))


def solved_example(record: Record, number: int | None = None) -> str:
    """One solved item (task + its gold response) to put in another item's auxiliary context; the task
    kind decides how the task is shown (tool use: the API name and request, not the whole documentation)."""
    from unisd import tasks

    task = tasks.of(record).solved_task(record)
    title = f"### [REFERENCE ONLY #{number}]" if number is not None else "### [REFERENCE ONLY]"
    return f"{title}\nReference Task:\n{task}\n\nReference Response:\n{record.reference.strip()}"


# --------------------------------------------------------------------------------------------------
# Messages


def _with_system(content: str, system: str | None) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def student_messages(record: Record, *, system: str | None = None) -> list[Message]:
    """[system?, user: x] -- the student prompt."""
    return _with_system(student_prompt(record), system)


def teacher_messages(
    record: Record, reference: str | None = None, *, system: str | None = None
) -> list[Message]:
    """[system?, user: x + c*] -- the teacher prompt of ALGORITHM.md; `reference` defaults to record.reference."""
    return _with_system(teacher_prompt(record, reference), system)


def negative_messages(record: Record, negative_text: str, *, system: str | None = None) -> list[Message]:
    """[system?, user: x + c-] -- the teacher prompt with a wrong demonstration in place of the gold one,
    so the positive and negative teachers differ only in the demonstration."""
    if not negative_text or not negative_text.strip():
        raise ValueError(f"{record.id}: the negative demonstration is empty")
    return _with_system(teacher_prompt(record, negative_text), system)


def context_prompt(
    record: Record, context_text: str, *, kind: Literal["examples", "instruction"] = "examples"
) -> str:
    """x with an auxiliary context a_k in front of it.

    kind="examples"    (random / retrieval contexts) context_text = solved examples of OTHER items, under
                       "Reference Samples (DO NOT SOLVE THESE)", then "Task to Solve (ONLY ANSWER THIS TASK)"
    kind="instruction" (induced contexts) context_text = a general instruction, under its own header
    """
    if not context_text or not context_text.strip():
        raise ValueError(f"{record.id}: the auxiliary context is empty")
    x = student_prompt(record)
    if kind == "examples":
        return (
            f"{REFERENCE_SAMPLES_HEADER}\nThe following are solved examples of OTHER tasks, given only as "
            f"reference. They are NOT the task to solve now; do not copy or mention them.\n\n"
            f"{context_text.strip()}\n\n-----\n{TASK_TO_SOLVE_HEADER}\n{x}"
        )
    if kind == "instruction":
        return f"{GENERAL_INSTRUCTION_HEADER}\n{context_text.strip()}\n\n{x}"
    raise ValueError(f"unknown context kind {kind!r}; expected 'examples' or 'instruction'")


def context_messages(
    record: Record,
    context_text: str,
    *,
    kind: Literal["examples", "instruction"] = "examples",
    system: str | None = None,
) -> list[Message]:
    """[system?, user: a_k + x] -- an auxiliary-context teacher view (see context_prompt)."""
    return _with_system(context_prompt(record, context_text, kind=kind), system)


# --------------------------------------------------------------------------------------------------
# Rendering


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")


def render_plain(messages: list[Message]) -> str:
    """Base-model prompt: system and user contents joined by blank lines, then "\\n\\nAnswer:"."""
    _check_messages(messages)
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user"):
            raise ValueError(
                f"messages[{i}]: plain (no chat template) rendering supports system/user, got {m['role']!r}"
            )
    return "\n\n".join(m["content"] for m in messages) + PLAIN_ANSWER_SUFFIX


def render_prompt(tokenizer: Any, messages: list[Message], *, chat: bool | None = None) -> str:
    """The prompt string a model generates from.

    chat=None picks the chat template when `tokenizer.chat_template` is set, plain text otherwise;
    chat=True without a template is an error.
    """
    _check_messages(messages)
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if not use_chat:
        return render_plain(messages)
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"chat=True but the tokenizer {type(tokenizer).__name__} has no chat_template; "
            "pass chat=False (plain prompt) or set tokenizer.chat_template"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def encode_prompt(tokenizer: Any, messages: list[Message], *, chat: bool | None = None) -> list[int]:
    """Token ids of render_prompt(...).

    A chat template writes its own special tokens (BOS included, when the model uses one), so chat prompts
    are encoded with add_special_tokens=False; plain prompts let the tokenizer add its usual BOS.
    """
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    text = render_prompt(tokenizer, messages, chat=use_chat)
    ids = tokenizer(text, add_special_tokens=not use_chat)["input_ids"]
    return [int(i) for i in ids]
