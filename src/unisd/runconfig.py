"""The run config: every stage's typed config composed into one, loaded from `configs/*.yaml`.

    model: smollm2-135m-instruct
    preset: unisd_star            # configs/presets/<name>.yaml (= unisd.objective.PRESETS)
    objective: {...}              # field overrides on top of the preset
    prepare / contexts / rollout / scoring / train / eval / tracking / pipeline: {...}

The objective is the single source of truth for the auxiliary-context kind and K: the contexts stage
takes them from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from unisd.config import ConfigError, StrictModel, check_model_spec, load_config
from unisd.contexts import ContextsConfig
from unisd.evaluate import EvalConfig
from unisd.objective import PRESETS, ObjectiveConfig, preset
from unisd.prepare import PrepareConfig
from unisd.rollout import RolloutConfig
from unisd.scoring import ScoringConfig
from unisd.tracking import TrackingConfig
from unisd.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


class PipelineSettings(StrictModel):
    rounds: int = Field(1, ge=1)  # staged rounds of rollout → score → train
    shards: int = Field(1, ge=1)  # ParallelFor fan-out of rollout and scoring
    pipeline_root: str = Field("runs/kfp", min_length=1)  # local runs: one folder per run under it


class RetrainConfig(StrictModel):
    """Scheduled retraining (`unisd schedule`): retrain only on new data, optionally from the champion."""

    skip_unchanged_data: bool = False  # the champion was trained on this data_hash: skip, reason in MLflow
    continue_from_champion: bool = False  # round 0 starts from the champion's weights instead of the base


class RunConfig(StrictModel):
    model: str = Field("smollm2-135m-instruct", min_length=1)
    preset: str = Field("unisd_star", min_length=1)
    objective: dict[str, Any] = {}
    prepare: PrepareConfig = PrepareConfig()
    contexts: ContextsConfig = ContextsConfig()
    rollout: RolloutConfig = RolloutConfig()
    scoring: ScoringConfig = ScoringConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    pipeline: PipelineSettings = PipelineSettings()
    retrain: RetrainConfig = RetrainConfig()

    def objective_config(self) -> ObjectiveConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; presets: {sorted(PRESETS)}")
        try:
            return ObjectiveConfig(**{**preset(self.preset).model_dump(), **self.objective})
        except ValueError as err:
            raise ConfigError(f"objective overrides {self.objective}: {err}") from None

    def contexts_config(self) -> ContextsConfig:
        obj = self.objective_config()
        return self.contexts.model_copy(update={"kind": obj.context_kind, "num_views": obj.num_views})

    @property
    def needs_contexts(self) -> bool:
        obj = self.objective_config()
        return obj.uses_views or obj.uses_negative


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, check_paths: bool = True
) -> RunConfig:
    """RunConfig from a YAML file (default: configs/demo.yaml) plus `key.sub=value` overrides. Every field
    is range-checked here, and (check_paths) the model spec too, before anything is loaded; submit /
    schedule skip the path check (a cluster path need not exist on this machine)."""
    cfg = load_config(RunConfig, path, overrides)
    cfg.objective_config()  # fail early on a bad preset or override
    if check_paths:
        check_model_spec(cfg.model)
    return cfg
