"""The UniSD pipeline (KFP v2): wiring only (no `from __future__ import annotations`: KFP reads the
parameter annotations at definition time).

    ExitHandler(end MLflow run) {
      resolve config → start MLflow run (checks the server first) → prepare → data check
      → If(data changed, or no skip asked) { starting model (champion or base) → contexts (+ negatives)
      → R rounds of { rollout ×shards (ParallelFor) → merge → score ×shards (ParallelFor) → merge → train }
      → eval per benchmark, base and adapted (ParallelFor) → register (alias challenger) → promote (if the gate says so)
      → report (HTML + Markdown) }
    }

The exit task runs whatever happens inside (a failed stage included): it replays what MLflow missed and
ends the run FINISHED / FAILED / KILLED with the pipeline's status, so no run is left RUNNING. KFP forbids an
exit task to depend on other tasks, so it takes the run parameters and finds the run by its tag. Nothing is
returned from inside the ExitHandler (kfp.local cannot). Every expensive stage runs after the MLflow check.

Rounds are unrolled at compile time (`build_pipeline(rounds=R)`); everything else is a run parameter the
user sets in the Kubeflow UI. Cluster settings (GPU requests, node selectors, tolerations, shm, timeouts,
retries, secrets, the sandbox pod label, the data source/volume/credentials of the prepare pod, run-scoped
progress folders on the cache PVC) are applied at compile time with `cluster=True`; `kfp.local`
ignores them, and `unisd run` compiles with `cluster=False` (kubernetes.CreatePVC etc. can't run locally).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml
from kfp import dsl

from components.stages import (
    TRAIN_IMAGE,
    contexts_op,
    data_check_op,
    end_tracking_op,
    eval_op,
    grade_op,
    merge_shards_op,
    negatives_op,
    prepare_op,
    promote_op,
    register_op,
    report_op,
    resolve_config_op,
    rollout_op,
    score_op,
    shard_indices_op,
    start_tracking_op,
    starting_model_op,
    train_op,
)
from unisd.data.benchmarks import is_data_uri

PIPELINE_NAME = "unisd-self-distillation"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# manifests/base/networkpolicy*.yaml: `unisd.ai/sandbox` denies all traffic; `unisd.ai/sandbox-kfp-launcher`
# then re-allows only what the KFP launcher inside the pod needs (DNS, KFP API, ML Metadata, the artifact
# store) — model-written code still reaches no internet and no MLflow.
SANDBOX_LABELS = {"unisd.ai/sandbox": "true", "unisd.ai/sandbox-kfp-launcher": "true"}
# Keys of the data Secret the prepare pod gets as env vars (each optional: a Secret holds those it needs).
DATA_SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "HF_TOKEN",
)


@dataclass(frozen=True)
class ClusterSettings:
    """Compile-time cluster settings: the `unisd-pipeline-settings` ConfigMap's UNISD_* keys (manifests/,
    charts/), read from the environment (the Helm upload Job gets them via envFrom)."""

    gpu_resource: str = "nvidia.com/gpu"
    gpu_count: int = 1
    gpu_node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    cache_pvc: str = "unisd-cache"
    cache_mount_path: str = "/cache"
    mlflow_tracking_uri: str = "http://unisd-mlflow.unisd.svc.cluster.local:5000"
    sandbox_labels: dict = field(default_factory=lambda: dict(SANDBOX_LABELS))
    # unisd.sandbox's backend in the grade and negatives pods (their $UNISD_SANDBOX_BACKEND): "" = auto, which
    # refuses to run code when bubblewrap/unshare cannot isolate it there; "rlimit" accepts the pod itself as the
    # boundary: set it only where those pods meet the hardened spec (docs/deploy.md, "Sandbox isolation").
    sandbox_backend: str = ""
    run_as_user: int = 10001  # the grade pod's uid (and gid): the images' unprivileged `unisd` user
    # Data for the prepare pod only (every later pod reads prepare's snapshot): where the built-in
    # benchmarks are (an s3:// gs:// az:// URI, or a path on the data PVC), the data PVC and its mount, and
    # a Secret whose keys become the prepare pod's env (object-storage / Hub credentials, by reference).
    data_source: str = ""
    data_pvc: str = ""
    data_mount_path: str = "/data"
    data_secret: str = ""
    data_secret_keys: list = field(default_factory=lambda: list(DATA_SECRET_KEYS))
    # The train step (unisd.launch): GPUs per train pod = torchrun ranks per node; nodes > 1 hands training
    # to a Kubeflow Trainer TrainJob on this ClusterTrainingRuntime (manifests/trainer/).
    train_gpus: int = 1
    train_nodes: int = 1
    trainer_runtime: str = "unisd-torch-distributed"

    @classmethod
    def from_env(cls, env=os.environ) -> "ClusterSettings":
        default = cls()

        def js(key, fallback):
            raw = env.get(key, "")
            value = json.loads(raw) if raw.strip() else None
            return value if value else fallback  # an empty {} / [] in the ConfigMap keeps our default

        return cls(
            gpu_resource=env.get("UNISD_GPU_RESOURCE") or default.gpu_resource,
            gpu_count=int(env.get("UNISD_GPU_COUNT") or default.gpu_count),
            gpu_node_selector=js("UNISD_GPU_NODE_SELECTOR", default.gpu_node_selector),
            gpu_tolerations=js("UNISD_GPU_TOLERATIONS", default.gpu_tolerations),
            cache_pvc=env.get("UNISD_CACHE_PVC") or default.cache_pvc,
            cache_mount_path=env.get("UNISD_CACHE_MOUNT_PATH") or default.cache_mount_path,
            mlflow_tracking_uri=env.get("UNISD_MLFLOW_TRACKING_URI") or default.mlflow_tracking_uri,
            sandbox_labels=js("UNISD_SANDBOX_POD_LABELS", default.sandbox_labels),
            sandbox_backend=_sandbox_backend(env),
            run_as_user=_positive(env, "UNISD_RUN_AS_USER", default.run_as_user),
            data_source=env.get("UNISD_DATA_SOURCE", "").strip(),
            data_pvc=env.get("UNISD_DATA_PVC", "").strip(),
            data_mount_path=env.get("UNISD_DATA_MOUNT_PATH") or default.data_mount_path,
            data_secret=env.get("UNISD_DATA_ENV_FROM", "").strip(),
            data_secret_keys=js("UNISD_DATA_ENV_VARS", default.data_secret_keys),
            train_gpus=_positive(env, "UNISD_TRAIN_GPUS", default.train_gpus),
            train_nodes=_positive(env, "UNISD_TRAIN_NODES", default.train_nodes),
            trainer_runtime=env.get("UNISD_TRAINER_RUNTIME") or default.trainer_runtime,
        )

    def data_dir(self) -> str:
        """What the prepare pod gets as $UNISD_DATA_DIR ("" = none): a URI as is; a path on the data PVC
        (relative paths are taken under its mount path). A path with no data PVC is refused here, at compile
        time: no pod would have it."""
        source = self.data_source
        if not source or is_data_uri(source):
            return source
        if not self.data_pvc:
            raise ValueError(
                f"UNISD_DATA_SOURCE={source!r} is a path, but UNISD_DATA_PVC is not set: no pod has a volume "
                "holding it (set UNISD_DATA_PVC, or use an s3:// gs:// az:// URI)"
            )
        path = PurePosixPath(self.data_mount_path, source)  # an absolute source stays as it is
        if not path.is_relative_to(self.data_mount_path):
            raise ValueError(
                f"UNISD_DATA_SOURCE={source!r} is not under the data PVC's mount path "
                f"UNISD_DATA_MOUNT_PATH={self.data_mount_path!r}"
            )
        return str(path)

    def launch_spec(self) -> dict:
        """The train step's unisd.launch.LaunchSpec (a train_op parameter, visible in the compiled IR)."""
        from unisd.launch import LaunchSpec

        return LaunchSpec(
            gpus=self.train_gpus,
            nodes=self.train_nodes,
            image=TRAIN_IMAGE,
            runtime=self.trainer_runtime,
            gpu_resource=self.gpu_resource,
            cpu_per_node=str(4 * self.train_gpus),  # what _gpu requests for an in-pod launch of as many GPUs
            memory_per_node=f"{64 * self.train_gpus}G",
            shm_size=_shm_size(self.train_gpus),
            cache_pvc=self.cache_pvc,
            cache_mount_path=self.cache_mount_path,
            node_selector=dict(self.gpu_node_selector),
            tolerations=list(self.gpu_tolerations),
        ).to_dict()


def _positive(env, key: str, fallback: int) -> int:
    raw = (env.get(key) or "").strip()
    if not raw:
        return fallback
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"pipeline settings: {key} must be an integer ≥ 1, got {raw!r}")
    return int(raw)


def _sandbox_backend(env) -> str:
    from unisd.sandbox import BACKENDS

    raw = (env.get("UNISD_SANDBOX_BACKEND") or "").strip()
    if raw and raw not in ("auto", *BACKENDS):
        raise ValueError(
            f"pipeline settings: UNISD_SANDBOX_BACKEND must be one of auto, {', '.join(BACKENDS)}, got {raw!r}"
        )
    return raw


def _shm_size(gpus: int) -> str:
    """/dev/shm for the train pod: NCCL and the DataLoader's workers share memory per rank (16 GiB for one)."""
    return f"{16 * max(1, gpus)}Gi"


def _gpu(task, settings: ClusterSettings, *, timeout_s: int = 6 * 3600, gpus: int | None = None):
    """GPU request + node selector + tolerations + shm + model cache + timeout + retries (`gpus`: this many
    instead of settings.gpu_count, with CPU, memory and shm scaled to match)."""
    from kfp import kubernetes

    n, scale = gpus or settings.gpu_count, gpus or 1  # other GPU stages keep one GPU's CPU/memory/shm
    task.set_accelerator_type(settings.gpu_resource).set_accelerator_limit(n)
    task.set_cpu_request(str(4 * scale)).set_memory_request(f"{32 * scale}G")
    task.set_memory_limit(f"{64 * scale}G")
    for key, value in settings.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in settings.gpu_tolerations:
        kubernetes.add_toleration(
            task,
            key=tol.get("key"),
            operator=tol.get("operator", "Equal"),
            value=tol.get("value"),
            effect=tol.get("effect"),
        )
    kubernetes.empty_dir_mount(
        task, volume_name="shm", mount_path="/dev/shm", medium="Memory", size_limit=_shm_size(scale)
    )
    kubernetes.mount_pvc(task, pvc_name=settings.cache_pvc, mount_path=settings.cache_mount_path)
    task.set_env_variable("HF_HOME", f"{settings.cache_mount_path}/hf")
    task.set_env_variable("UNISD_CACHE_DIR", f"{settings.cache_mount_path}/unisd")
    _progress(task, settings)
    kubernetes.set_timeout(task, timeout_s)
    task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
    return _secrets(task, settings)


# The run's name, for run-scoped progress folders: the Argo workflow of a KFP run (unique per run, the same
# for a retried pod). KFP does not resolve its {{$.pipeline_job_uuid}} placeholders in env values (its
# driver copies them verbatim), so the pod reads the name from its own label (downward API), and
# unisd.artifacts.progress_dir expands the $(…) reference (KFP lists that env after the container env).
RUN_NAME_ENV, RUN_NAME_FIELD = "UNISD_KFP_RUN", "metadata.labels['workflows.argoproj.io/workflow']"


def _progress(task, settings: ClusterSettings):
    """Rollout partials, train checkpoints and eval progress on the cache PVC, per run and task (each stage
    adds `<stage>-<inputs hash>`, which tells ParallelFor iterations apart), so a retried pod resumes; its
    KFP output holds only results."""
    from kfp import kubernetes

    from unisd.artifacts import PROGRESS_DIR_ENV

    kubernetes.use_field_path_as_env(task, env_name=RUN_NAME_ENV, field_path=RUN_NAME_FIELD)
    task.set_env_variable(
        PROGRESS_DIR_ENV, f"{settings.cache_mount_path}/progress/$({RUN_NAME_ENV})/{task.name}"
    )
    return task


def _secrets(task, settings: ClusterSettings):
    """MLflow credentials from a Kubernetes secret (optional: a server without auth needs none). Artifacts
    go through the MLflow server (--artifacts-destination), so pipeline pods need no S3 credentials."""
    from kfp import kubernetes

    kubernetes.use_secret_as_env(
        task,
        secret_name="unisd-mlflow-auth",
        secret_key_to_env={"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
        optional=True,
    )
    return task


def _cpu(task, settings: ClusterSettings, *, cpu: str = "2", memory: str = "8G"):
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
    return _secrets(task, settings)


def _train(task, settings: ClusterSettings):
    """The train step: UNISD_TRAIN_GPUS GPUs for torchrun in this pod; with UNISD_TRAIN_NODES > 1 the pod only
    launches and watches the TrainJob (no GPU), with the cache PVC to stage inputs and collect the output."""
    from kfp import kubernetes

    if settings.train_nodes == 1:
        return _gpu(task, settings, gpus=settings.train_gpus)
    _cpu(task, settings, cpu="1", memory="4G")
    kubernetes.mount_pvc(task, pvc_name=settings.cache_pvc, mount_path=settings.cache_mount_path)
    kubernetes.set_timeout(task, 6 * 3600 + 1800)  # the TrainJob's own deadline, plus staging and collecting
    return task


def _sandbox_label(task, settings: ClusterSettings):
    """Steps that execute model-written code: label the pod so the NetworkPolicy denies egress."""
    from kfp import kubernetes

    for key, value in settings.sandbox_labels.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
    return task


def _sandbox_pod(task, settings: ClusterSettings):
    """The steps that run model-written code (grade, negatives): the sandbox image (their components' base
    image), the sandbox label (egress denied), non-root, CPU only, no volume, no credentials, a deadline; and
    the sandbox backend of the cluster settings (rlimit only where these pods are hardened)."""
    from kfp import kubernetes

    _sandbox_label(task, settings)
    uid = settings.run_as_user
    kubernetes.set_security_context(task, run_as_user=uid, run_as_group=uid, run_as_non_root=True)
    task.set_cpu_request("2").set_cpu_limit("4").set_memory_request("4G").set_memory_limit("8G")
    if settings.sandbox_backend:
        from unisd.sandbox import BACKEND_ENV

        task.set_env_variable(BACKEND_ENV, settings.sandbox_backend)
    kubernetes.set_timeout(task, 2 * 3600)
    task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)
    return task


def _data(task, settings: ClusterSettings):
    """The prepare pod's data: $UNISD_DATA_DIR (the built-ins' location), the data PVC, the credentials
    Secret as env. No other pod gets them: later stages read prepare's snapshot."""
    from kfp import kubernetes

    data_dir = settings.data_dir()
    if data_dir:
        task.set_env_variable("UNISD_DATA_DIR", data_dir)
    if settings.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=settings.data_pvc, mount_path=settings.data_mount_path)
    if settings.data_secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=settings.data_secret,
            secret_key_to_env={key: key for key in settings.data_secret_keys},
            optional=True,  # per key: a Secret with only the AWS pair is enough (no session token etc.)
        )
    return task


# Where each stage runs on a cluster: "gpu" (accelerator + cache), "cpu", "sandbox" (the hardened pod of the
# steps that execute model-written code: grade, and negatives, which checks that code negatives fail their
# tests), "data" for the one stage that reads the data sources.
PLACEMENT: dict[str, tuple[str, ...]] = {
    "resolve-config": (),
    "start-tracking": ("cpu",),
    "end-tracking": ("cpu",),
    "prepare": ("cpu", "data"),
    "data-check": ("cpu",),
    "starting-model": ("cpu",),
    "contexts": ("gpu",),
    "negatives": ("sandbox",),
    "shards": (),
    "rollout": ("gpu",),
    "gather": ("cpu",),
    "score": ("gpu",),
    "train": ("train",),
    "eval": ("gpu",),
    "grade": ("sandbox",),
    "register": ("cpu",),
    "promote": ("cpu",),
    "report": ("cpu",),
}
_PLACERS = {
    "gpu": _gpu,
    "cpu": _cpu,
    "sandbox": _sandbox_pod,
    "data": _data,
    "train": _train,
}


def place(task, stage: str, title: str, settings: ClusterSettings | None):
    """Display name + the stage's cluster placement (PLACEMENT); kfp.local runs skip the placement."""
    task.set_display_name(title)
    for kind in PLACEMENT[stage] if settings is not None else ():
        _PLACERS[kind](task, settings)
    return task


def distillation_round(r: int, *, config, prepared, contexts, shards, num_shards, student, settings):
    """One staged round's data: rollout ×shards → gather → score ×shards → gather. Returns the gathered
    (rollouts, scores) tasks. Round 0's `student` is the retrain check's output: the champion's weights, or
    a folder that says "the base model"."""
    from_student = {"student": student}
    with dsl.ParallelFor(shards.output, name=f"rollout-round-{r}") as shard:
        roll = rollout_op(
            config=config, prepared=prepared, shard=shard, num_shards=num_shards, **from_student
        )
        place(roll, "rollout", f"Rollout (round {r})", settings)
    rollouts = merge_shards_op(parts=dsl.Collected(roll.outputs["rollout"]), filenames=["completions.jsonl"])
    place(rollouts, "gather", f"Gather rollouts (round {r})", settings)
    with dsl.ParallelFor(shards.output, name=f"score-round-{r}") as shard:
        sc = score_op(
            config=config,
            prepared=prepared,
            contexts=contexts,
            rollouts=rollouts.outputs["merged"],
            shard=shard,
            num_shards=num_shards,
            **from_student,
        )
        place(sc, "score", f"Multi-view scoring (round {r})", settings)
    scores = merge_shards_op(
        parts=dsl.Collected(sc.outputs["scores"]), filenames=["scores.safetensors", "ids.json"]
    )
    place(scores, "gather", f"Gather scores (round {r})", settings)
    return rollouts, scores


def evaluate_register_report(*, config, prepared, benchmarks, student, scores, run, settings):
    """Eval + grade per benchmark (base and distilled, ParallelFor) → register (alias challenger) → promote (when the
    gate says so) → report."""
    with dsl.ParallelFor(benchmarks, name="eval-benchmarks") as bench:
        base_eval = place(
            eval_op(config=config, prepared=prepared, benchmark=bench),
            "eval",
            "Evaluate base model",
            settings,
        )
        base_grade = grade_op(
            config=config, prepared=prepared, benchmark=bench, samples=base_eval.outputs["samples"]
        )
        place(base_grade, "grade", "Grade base model (sandbox)", settings)
        new_eval = eval_op(config=config, prepared=prepared, benchmark=bench, model=student)
        place(new_eval, "eval", "Evaluate distilled model", settings)
        new_grade = grade_op(
            config=config, prepared=prepared, benchmark=bench, samples=new_eval.outputs["samples"]
        )
        place(new_grade, "grade", "Grade distilled model (sandbox)", settings)

    # A fresh Collected per consumer: KFP 2.17's compiler fails when one Collected object feeds two tasks.
    def evals():
        return {
            "evals": dsl.Collected(new_grade.outputs["results"]),
            "base_evals": dsl.Collected(base_grade.outputs["results"]),
        }

    gate = register_op(
        config=config,
        run_id=run.outputs["run_id"],
        model=student,
        prepared=prepared,
        pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        **evals(),
    )
    place(gate, "register", "Register model + promotion gate", settings)
    promote = promote_op(config=config, version=gate.outputs["version"], decision=gate.outputs["decision"])
    place(promote, "promote", "Promote to champion (if the gate says so)", settings)
    rep = report_op(
        config=config,
        run_id=run.outputs["run_id"],
        model=student,
        scores=scores,
        decision=gate.outputs["decision"],
        **evals(),
    )
    place(rep, "report", "Run report", settings)


def pipeline_body(config_yaml, ui, extra_overrides, *, defaults, rounds, launch, settings) -> None:
    """Everything inside the ExitHandler (`ui`: the run parameters as pipeline channels): resolve the config,
    open the MLflow run, prepare, check whether the data changed, then train / evaluate / register / report."""
    resolved = resolve_config_op(
        config_yaml=config_yaml, **ui, extra_overrides=extra_overrides, ui_defaults=defaults
    )
    place(resolved, "resolve-config", "Resolve config", settings)
    cfg = resolved.outputs["config"]
    run = place(
        start_tracking_op(config=cfg, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER),
        "start-tracking",
        "Start MLflow run",
        settings,
    )
    prep = place(prepare_op(config=cfg), "prepare", "Prepare data", settings)
    prep.after(run)  # MLflow down → the pipeline stops in seconds, before any expensive stage
    prepared = prep.outputs["prepared"]
    check = data_check_op(config=cfg, prepared=prepared, run_id=run.outputs["run_id"])
    place(check, "data-check", "Data changed since the champion?", settings)
    with dsl.If(check.output == "train", name="data-changed"):
        student, scores = training_rounds(
            cfg, prepared, run, num_shards=ui["num_shards"], rounds=rounds, launch=launch, settings=settings
        )
        evaluate_register_report(
            config=cfg,
            prepared=prepared,
            benchmarks=ui["benchmarks"],
            student=student,
            scores=scores.outputs["merged"],
            run=run,
            settings=settings,
        )


def training_rounds(cfg, prepared, run, *, num_shards, rounds: int, launch, settings):
    """Starting model → contexts → `rounds` × (rollout → score → train); returns (the last student model,
    the last round's gathered scores task)."""
    start = starting_model_op(config=cfg, run_id=run.outputs["run_id"])
    place(start, "starting-model", "Starting model (champion or base)", settings)
    draft = place(
        contexts_op(config=cfg, prepared=prepared),
        "contexts",
        "Auxiliary contexts + negative candidates",
        settings,
    )
    ctx = negatives_op(config=cfg, prepared=prepared, draft=draft.outputs["draft"])
    place(ctx, "negatives", "Check negatives (sandbox)", settings)
    shards = place(shard_indices_op(num_shards=num_shards), "shards", "Shards", settings)
    student, scores = start.outputs["model"], None  # round 0: the champion's weights or the base
    for r in range(rounds):
        round_data = dict(config=cfg, prepared=prepared, contexts=ctx.outputs["contexts"])
        rollouts, scores = distillation_round(
            r, **round_data, shards=shards, num_shards=num_shards, student=student, settings=settings
        )
        tr = train_op(
            **round_data,
            rollouts=rollouts.outputs["merged"],
            scores=scores.outputs["merged"],
            run_id=run.outputs["run_id"],
            round_index=r,
            launch=launch,
            previous=student,
        )
        student = place(tr, "train", f"Distillation training (round {r})", settings).outputs["model"]
    return student, scores


def build_pipeline(*, rounds: int = 1, cluster: bool = True, config_path: str | Path = DEFAULT_CONFIG):
    """The pipeline function, with `rounds` unrolled and cluster settings on or off (kfp.local: off)."""
    from unisd.config import load_config
    from unisd.pipeline_steps import ui_values
    from unisd.runconfig import RunConfig

    settings = ClusterSettings.from_env() if cluster else None
    config = load_config(RunConfig, config_path)
    defaults = ui_values(config)
    defaults["mlflow_tracking_uri"] = (
        settings.mlflow_tracking_uri if settings else config.tracking.tracking_uri
    )
    # One line of JSON (which is YAML): KFP copies parameter defaults into a comment header of the IR
    # file, and a multi-line default there makes the whole file invalid YAML.
    default_config = json.dumps(yaml.safe_load(Path(config_path).read_text()))
    d = defaults
    launch = settings.launch_spec() if settings else {}  # kfp.local: one process

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Reliability-aware self-distillation (UniSD) with MLflow tracking and gated promotion.",
    )
    def unisd_pipeline(
        config_yaml: str = default_config,
        model: str = d["model"],
        preset: str = d["preset"],
        benchmarks: list = d["benchmarks"],
        num_shards: int = d["num_shards"],
        budget: float = d["budget"],
        max_new_tokens: int = d["max_new_tokens"],
        lora: bool = d["lora"],
        mlflow_tracking_uri: str = d["mlflow_tracking_uri"],
        registered_model: str = d["registered_model"],
        promotion_margin: float = d["promotion_margin"],
        extra_overrides: list = [],  # noqa: B006 (KFP parameter default): more key.sub=value strings
    ):
        ui = dict(
            model=model,
            preset=preset,
            benchmarks=benchmarks,
            num_shards=num_shards,
            budget=budget,
            max_new_tokens=max_new_tokens,
            lora=lora,
            mlflow_tracking_uri=mlflow_tracking_uri,
            registered_model=registered_model,
            promotion_margin=promotion_margin,
        )
        end = end_tracking_op(
            config_yaml=config_yaml,
            **ui,
            extra_overrides=extra_overrides,
            ui_defaults=defaults,
            pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
        end.set_caching_options(False)  # it must run every time, with this attempt's status
        place(end, "end-tracking", "End MLflow run", settings)
        with dsl.ExitHandler(end, name="unisd-run"):
            pipeline_body(
                config_yaml,
                ui,
                extra_overrides,
                defaults=defaults,
                rounds=rounds,
                launch=launch,
                settings=settings,
            )

    return unisd_pipeline
