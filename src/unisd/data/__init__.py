"""Benchmarks and user datasets as `Record`s, and the prompts built from them (docs/benchmarks.md,
docs/datasets.md)."""

from unisd.data.benchmarks import (
    BENCHMARK_SPECS,
    BENCHMARKS,
    DATA_DIR_ENV,
    DEFAULT_SEED,
    SPLIT_FRACTIONS,
    SPLIT_SALT,
    assign_split,
    available_splits,
    load_benchmark,
    render_tool_calls,
    resolve_data_dir,
)
from unisd.data.prompts import (
    context_messages,
    encode_prompt,
    negative_messages,
    render_prompt,
    solved_example,
    student_messages,
    teacher_messages,
)
from unisd.data.records import Record
from unisd.data.sources import DatasetSpec, dataset_name, load_dataset_records

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_SPECS",
    "DATA_DIR_ENV",
    "DEFAULT_SEED",
    "DatasetSpec",
    "SPLIT_FRACTIONS",
    "SPLIT_SALT",
    "Record",
    "assign_split",
    "available_splits",
    "context_messages",
    "dataset_name",
    "encode_prompt",
    "load_benchmark",
    "load_dataset_records",
    "negative_messages",
    "render_prompt",
    "render_tool_calls",
    "resolve_data_dir",
    "solved_example",
    "student_messages",
    "teacher_messages",
]
