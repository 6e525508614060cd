"""Tool use (ToolAlpaca): call the documented APIs; scored offline by matching the calls with the gold ones.

task_text / format_instruction   the API documentation + the request, answered as ReAct blocks
                                 ("Action: <tool>\nAction Input: {json}")
reference / gold_completion      the gold calls rendered as ReAct blocks (`render_tool_calls`)
parse_tool_calls                 the calls in a reply (ReAct steps or JSON function calls)
score                            per-item F1 over (call name + key=value argument) matches; aggregate
                                 name-F1, argument-F1 and exact match (Hammer-style micro averages)
negatives                        a wrong action / wrong arguments / wrong interpretation / extra calls,
                                 accepted when the parsed calls differ from the gold ones; fallback: the
                                 gold calls with one argument value changed (or an extra call)
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unisd.data.records import Record
from unisd.tasks._shared import json_reply_instruction

KIND = "tool_use"


def validate(record: Record) -> None:
    if not record.gold_calls:
        raise ValueError(f"{record.id}: a tool-use record needs gold_calls")


# --------------------------------------------------------------------------------------------------
# prompt and references


def task_text(record: Record) -> str:
    return record.question


def format_instruction(record: Record) -> str:
    return (
        "Answer the request by calling the tools above. There are no tool outputs to wait for: write every "
        'call the request needs, in order, each in this format (a short "Thought: ..." line before a call '
        "is allowed):\nAction: <tool name>\nAction Input: <the arguments as a JSON object>"
    )


def render_tool_calls(calls: list[dict[str, Any]]) -> str:
    """Gold calls as ReAct text, one "Action: name\\nAction Input: {json}" block per call, in order.

    Arguments are re-serialised with json.dumps (uniform spacing); a call whose source arguments are
    not valid JSON (ToolAlpaca's `${x from y}` placeholders) keeps its raw string.
    """
    blocks = []
    for call in calls:
        args = call.get("arguments")
        args_text = json.dumps(args, ensure_ascii=False) if args is not None else call["arguments_raw"]
        blocks.append(f"Action: {call['name']}\nAction Input: {args_text}")
    return "\n".join(blocks)


def gold_completion(record: Record) -> str:
    return record.reference.strip()


def fit_target(record: Record) -> str:
    return record.answer


def retrieval_text(record: Record) -> str:
    """The API and the request, not the whole documentation (MiniLM reads only its first 256 word pieces)."""
    return f"API: {record.meta.get('api_name', '?')}\nUser request: {record.meta.get('instruction', '')}"


solved_task = retrieval_text  # a donor in another item's context: the API name and request only


# --------------------------------------------------------------------------------------------------
# parsing calls

_ACTION = re.compile(r"^[ \t]*Action\s*(?:\d+)?\s*:[ \t]*(.+?)[ \t]*$", re.M)


_ACTION_INPUT = re.compile(r"^[ \t]*Action\s*Input\s*(?:\d+)?\s*:[ \t]*", re.M)


_REACT_STOP = re.compile(r"^[ \t]*(?:Observation|Thought|Action|Final Answer)\s*(?:\d+)?\s*:", re.M)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Tool calls in a model reply, in order: [{"name", "arguments", "arguments_raw"}].

    Understands ReAct steps ("Action: name" then "Action Input: {json}", any number of steps; the
    input runs to the next Observation/Thought/Action line) and JSON function calls: a list or a
    single object with "name" and "arguments"/"parameters"/"args" (arguments may be a JSON string),
    {"tool_calls": [...]}, OpenAI-style {"function": {...}}, also inside ```json fences or
    <tool_call> tags. `arguments` is a dict, or None when the input is not a JSON/Python mapping
    (then `arguments_raw` still holds it).
    """
    if not text:
        return []
    if _ACTION.search(text) and _ACTION_INPUT.search(text) or re.search(r"^[ \t]*Action\s*:", text, re.M):
        calls = _parse_react(text)
        if calls:
            return calls
    return _parse_json_calls(text)


def _parse_react(text: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for match in _ACTION.finditer(text):
        line_start = text.rfind("\n", 0, match.start()) + 1
        if _ACTION_INPUT.match(text, line_start):
            continue  # this "Action ...:" line is an Action Input line
        name = match.group(1).strip().strip("`*\"'")
        name = re.sub(r"\(.*\)$", "", name).strip()
        rest = text[match.end() :]
        raw = ""
        following = _ACTION_INPUT.search(rest)
        next_action = _next_action(rest)
        if following and (next_action is None or following.start() <= next_action):
            body = rest[following.end() :]
            stop = _REACT_STOP.search(body)
            raw = (body[: stop.start()] if stop else body).strip()
        if not name or name.lower() in ("none", "n/a", "finish", "final answer"):
            continue
        calls.append({"name": name, "arguments": _parse_arguments(raw), "arguments_raw": raw})
    return calls


def _next_action(rest: str) -> int | None:
    for match in _ACTION.finditer(rest):
        line_start = rest.rfind("\n", 0, match.start()) + 1
        if not _ACTION_INPUT.match(rest, line_start):
            return match.start()
    return None


def _parse_arguments(raw: str) -> dict[str, Any] | None:
    raw = raw.strip()
    if raw.startswith("```"):
        raw = re.sub(r"^```\w*\s*|\s*```$", "", raw)
    if not raw:
        return {}
    start = raw.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(raw[start:])
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
        end = raw.rfind("}")
        if end > start:
            try:
                value = ast.literal_eval(raw[start : end + 1])
                if isinstance(value, dict):
                    return value
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
    return None


def _parse_json_calls(text: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i] not in "[{":
            i += 1
            continue
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        found = _calls_from_json(value)
        if found:
            calls.extend(found)
            i = end
        else:
            i += 1
    return calls


def _calls_from_json(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        out: list[dict[str, Any]] = []
        for item in value:
            out.extend(_calls_from_json(item))
        return out
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("tool_calls"), list):
        return _calls_from_json(value["tool_calls"])
    if isinstance(value.get("function"), dict):
        return _calls_from_json(value["function"])
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return []
    args: Any = next((value[k] for k in ("arguments", "parameters", "args") if k in value), {})
    if isinstance(args, str):
        raw = args
        args = _parse_arguments(args)
    else:
        raw = json.dumps(args, ensure_ascii=False)
    return [{"name": name, "arguments": args if isinstance(args, dict) else None, "arguments_raw": raw}]


# --------------------------------------------------------------------------------------------------
# scoring (offline call match)

# Gold inputs that depend on an earlier observation ("${animeId from searchAnime}", "{start date}")
# cannot be known offline: any non-empty predicted value matches them.
_PLACEHOLDER = re.compile(r"\$\{[^{}]*\}\"?|\"\{[^{}\"]*\}\"")


WILDCARD = "\x00any\x00"


def parse_gold_arguments(raw: str) -> dict[str, Any] | None:
    """Parse a gold Action_Input that is not valid JSON because of placeholders (-> WILDCARD values)."""
    try:
        value = json.loads(raw)
        return value if isinstance(value, dict) else None
    except (json.JSONDecodeError, TypeError):
        pass
    replaced = _PLACEHOLDER.sub(lambda _: json.dumps(WILDCARD), raw)
    try:
        value = json.loads(replaced)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _norm_value(value: Any) -> str:
    """Hammer-style comparison on strings, with numbers and JSON values made canonical."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _arg_pairs(arguments: Mapping[str, Any] | None) -> dict[str, str]:
    """key -> normalised value, for the non-empty values only (Hammer counts no empty values)."""
    if not isinstance(arguments, Mapping):
        return {}
    pairs = {}
    for key, value in arguments.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        pairs[str(key)] = WILDCARD if value == WILDCARD else _norm_value(value)
    return pairs


def _gold_pairs(call: Mapping[str, Any]) -> dict[str, str]:
    arguments = call.get("arguments")
    if arguments is None and isinstance(call.get("arguments_raw"), str):
        arguments = parse_gold_arguments(call["arguments_raw"])
    return _arg_pairs(arguments)


def _matching_args(gold: dict[str, str], pred: dict[str, str]) -> int:
    return sum(1 for k, v in gold.items() if k in pred and (v == WILDCARD or pred[k] == v))


@dataclass(frozen=True)
class ToolCallCounts:
    """Counts for one item; sum them over a dataset for micro-averaged F1 (as Hammer does)."""

    name_correct: int
    name_predicted: int
    name_gold: int
    arg_correct: int
    arg_predicted: int
    arg_gold: int
    exact: bool


def score_tool_calls(
    predicted: Sequence[Mapping[str, Any]], gold: Sequence[Mapping[str, Any]]
) -> ToolCallCounts:
    """Compare predicted calls [{name, arguments}] with gold calls [{name, arguments, arguments_raw}].

    Names match one-to-one (a name predicted twice but gold once counts once). Each gold call is
    paired with the unused predicted call of the same name that gets most of its arguments right;
    argument pairs are key=value with non-empty values, compared as normalised strings. `exact` needs
    the same number of calls, the same names in the same order and equal argument pairs.
    """
    pred_pairs = [_arg_pairs(c.get("arguments")) for c in predicted]
    gold_pairs = [_gold_pairs(c) for c in gold]
    used: set[int] = set()
    name_correct = arg_correct = 0
    for g_call, g_args in zip(gold, gold_pairs):
        best, best_score = None, -1
        for j, p_call in enumerate(predicted):
            if j in used or p_call.get("name") != g_call.get("name"):
                continue
            score = _matching_args(g_args, pred_pairs[j])
            if score > best_score:
                best, best_score = j, score
        if best is not None:
            used.add(best)
            name_correct += 1
            arg_correct += best_score
    exact = len(predicted) == len(gold) and all(
        p.get("name") == g.get("name") and set(pp) == set(gp) and _matching_args(gp, pp) == len(gp)
        for p, g, pp, gp in zip(predicted, gold, pred_pairs, gold_pairs)
    )
    return ToolCallCounts(
        name_correct=name_correct,
        name_predicted=len(predicted),
        name_gold=len(gold),
        arg_correct=arg_correct,
        arg_predicted=sum(len(p) for p in pred_pairs),
        arg_gold=sum(len(g) for g in gold_pairs),
        exact=exact,
    )


def prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else (1.0 if gold == 0 else 0.0)
    recall = correct / gold if gold else (1.0 if predicted == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def tool_call_scores(
    predictions: Sequence[Sequence[Mapping[str, Any]]], golds: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, float]:
    """Dataset-level ToolAlpaca scores: micro name-P/R/F1, argument-P/R/F1, exact-match rate."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold call lists")
    if not golds:
        raise ValueError("tool_call_scores: no items")
    counts = [score_tool_calls(p, g) for p, g in zip(predictions, golds)]
    total = {f: sum(getattr(c, f) for c in counts) for f in ("name_correct", "name_predicted", "name_gold")}
    total |= {f: sum(getattr(c, f) for c in counts) for f in ("arg_correct", "arg_predicted", "arg_gold")}
    name_p, name_r, name_f1 = prf(total["name_correct"], total["name_predicted"], total["name_gold"])
    arg_p, arg_r, arg_f1 = prf(total["arg_correct"], total["arg_predicted"], total["arg_gold"])
    return {
        "name_precision": name_p,
        "name_recall": name_r,
        "name_f1": name_f1,
        "arg_precision": arg_p,
        "arg_recall": arg_r,
        "arg_f1": arg_f1,
        "exact_match": sum(c.exact for c in counts) / len(counts),
        "n": float(len(counts)),
    }


def score(
    records: Sequence[Record], samples: Sequence[Sequence[str]], settings: Any = None
) -> dict[str, Any]:
    """score = per-item F1 over (call name + key=value argument) matches of the first sample."""
    predicted = [parse_tool_calls(ss[0]) for ss in samples]
    golds = [r.gold_calls or [] for r in records]
    per_item = []
    for r, pred, gold in zip(records, predicted, golds):
        c = score_tool_calls(pred, gold)
        f1 = prf(
            c.name_correct + c.arg_correct, c.name_predicted + c.arg_predicted, c.name_gold + c.arg_gold
        )[2]
        per_item.append({"id": r.id, "score": f1, "exact": c.exact, "num_predicted_calls": len(pred)})
    return {"metric": "call_f1", "per_item": per_item, "aggregate": tool_call_scores(predicted, golds)}


def same_calls(calls: Sequence[dict[str, Any]], gold: Sequence[dict[str, Any]]) -> bool:
    """Whether predicted calls equal the gold calls: the evaluator's exact match."""
    return bool(score_tool_calls(calls, gold).exact)


# --------------------------------------------------------------------------------------------------
# negative demonstrations

TOOL_CORRUPTIONS: dict[str, str] = {
    "wrong action": "Call a plausible but WRONG tool: one that sounds related to the request but is not "
    "`{gold}`.",
    "wrong arguments": "Call the right tool, `{gold}`, but with WRONG argument values (a wrong value, or a "
    "swapped or missing field).",
    "wrong interpretation": "Misread the request: call `{gold}` for a subtly different purpose than the one "
    "the user asked for.",
    "extra calls": "Make the right call, then add an unnecessary extra tool call, as if over-interpreting the "
    "request.",
}


def negative_strategies(record: Record, count: int, seed: int) -> list[str]:
    """`count` corruptions, round-robin."""
    pool = list(TOOL_CORRUPTIONS)
    return [pool[i % len(pool)] for i in range(count)]


def negative_request(record: Record, strategy: str) -> list[dict[str, str]]:
    gold = (record.gold_calls or [{"name": "?"}])[0]["name"]
    content = (
        "You are simulating an AI assistant that makes a mistake when calling tools.\n"
        f"{TOOL_CORRUPTIONS[strategy].format(gold=gold)}\n\n{task_text(record)}\n\n"
        "Rules:\n- The answer must look like a genuine attempt, one call per block in the format\n"
        "  Action: <tool name>\n  Action Input: <the arguments as a JSON object>\n"
        "- The mistake must be subtle and plausible. Do not mention it.\n\n"
        + json_reply_instruction("<a short thought>", "Action: <tool name>\\nAction Input: {...}")
    )
    return [{"role": "user", "content": content}]


def judge_negative(record: Record, reasoning: str, answer: str | None, raw: str, cfg: Any) -> dict[str, Any]:
    """Acceptable when calls parse and differ from the gold calls."""
    calls = parse_tool_calls(answer if answer and "Action" in answer else raw)
    if not calls:
        return {"why": "no tool call parsed"}
    rendered = render_tool_calls(calls)
    if same_calls(calls, record.gold_calls or []):
        return {"answer": rendered, "why": "same calls as the gold answer"}
    return {"answer": rendered, "text": rendered, "valid": True, "validated": True}


def _wrong_value(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value[:-1] if value.endswith("s") and len(value) > 1 else value + "s"
    if isinstance(value, list):
        return value[:-1] if value else ["?"]
    return None if value is not None else "?"


def tool_fallback(record: Record) -> tuple[str, list[dict[str, Any]]]:
    """(rendered calls, calls): the gold calls with the first argument value of the first call that has
    arguments changed; when no call has arguments, the gold calls plus an unneeded extra call."""
    calls = copy.deepcopy(record.gold_calls or [])
    if not calls:
        raise ValueError(f"{record.id}: a tool-use record needs gold_calls")
    for call in calls:
        args = call.get("arguments")
        if isinstance(args, dict) and args:
            key = next(iter(args))
            args[key] = _wrong_value(args[key])
            call["arguments_raw"] = json.dumps(args, ensure_ascii=False)
            return render_tool_calls(calls), calls
    calls.append(
        {
            "name": "getDetails",
            "arguments": {"Question": "Which parameters does this need?"},
            "arguments_raw": '{"Question": "Which parameters does this need?"}',
        }
    )
    return render_tool_calls(calls), calls


def fallback_negative(record: Record, cfg: Any) -> dict[str, Any]:
    text, calls = tool_fallback(record)
    how = "extra call" if len(calls) > len(record.gold_calls or []) else "wrong argument value"
    return {
        "text": text,
        "answer": text,
        "validated": not same_calls(calls, record.gold_calls or []),
        "how": how,
    }
