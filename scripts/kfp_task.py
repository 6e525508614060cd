"""Turn one task of a compiled KFP pipeline (IR YAML) into the command line its container runs, with
its executor input filled in: parameters from the pipeline's defaults (or --param NAME=JSON),
input artifacts from earlier tasks' output URIs under --root (or --artifact NAME=URI), outputs under
--root/<task>/. TASK may sit inside a sub-DAG (ExitHandler, ParallelFor): its loop item and the artifacts the
sub-DAG hands down are given with --param / --artifact.

    python scripts/kfp_task.py PIPELINE.yaml TASK --root /out > argv.bin   (NUL-separated: image, argv...)

Used by scripts/check_images.sh to `podman run` a component the way the KFP launcher would call it.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


def find_task(ir: dict, task: str) -> dict:
    """The task's spec in the root DAG or in any component's sub-DAG."""
    dags = [ir["root"]["dag"]] + [c["dag"] for c in ir["components"].values() if "dag" in c]
    for dag in dags:
        if task in dag.get("tasks", {}):
            return dag["tasks"][task]
    raise SystemExit(f"no task {task!r} in the pipeline")


def task_argv(
    ir: dict, task: str, root: str, params: dict, artifacts: dict | None = None
) -> tuple[str, list[str]]:
    artifacts = artifacts or {}
    spec = find_task(ir, task)
    comp = ir["components"][spec["componentRef"]["name"]]
    executor = ir["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
    defaults = {
        name: p.get("defaultValue")
        for name, p in ir["root"].get("inputDefinitions", {}).get("parameters", {}).items()
    }
    values = {}
    for name, source in spec.get("inputs", {}).get("parameters", {}).items():
        if name in params:
            values[name] = params[name]
        elif "componentInputParameter" in source:
            # a sub-DAG (ExitHandler) hands a pipeline parameter down as "pipelinechannel--<name>"
            root_name = source["componentInputParameter"].removeprefix("pipelinechannel--")
            if root_name not in defaults and root_name not in params:
                raise SystemExit(
                    f"{task}: parameter {name} comes from the enclosing DAG; pass --param {name}=JSON"
                )
            values[name] = params.get(root_name, defaults.get(root_name))
        elif "runtimeValue" in source:
            values[name] = source["runtimeValue"]["constant"]
        else:
            raise SystemExit(f"{task}: parameter {name} comes from another task; pass --param {name}=JSON")

    def artifact(name: str, kind: dict, uri: str) -> dict:
        return {"artifacts": [{"name": name, "type": kind, "uri": uri, "metadata": {}}]}

    inputs = {}
    for name, source in spec.get("inputs", {}).get("artifacts", {}).items():
        kind = comp["inputDefinitions"]["artifacts"][name]["artifactType"]
        if name in artifacts:
            inputs[name] = artifact(name, kind, artifacts[name])
            continue
        producer = source.get("taskOutputArtifact")
        if producer is None:
            raise SystemExit(
                f"{task}: artifact {name} comes from the enclosing DAG; pass --artifact {name}=URI"
            )
        inputs[name] = artifact(
            name, kind, f"{root}/{producer['producerTask']}/{producer['outputArtifactKey']}"
        )
    outputs = {
        name: artifact(name, d["artifactType"], f"{root}/{task}/{name}")
        for name, d in comp.get("outputDefinitions", {}).get("artifacts", {}).items()
    }
    executor_input = {
        "inputs": {"parameterValues": values, "artifacts": inputs},
        "outputs": {"artifacts": outputs, "outputFile": f"{root}/{task}/executor_output.json"},
    }
    text = json.dumps(executor_input)
    argv = [a.replace("{{$}}", text) for a in [*executor["command"], *executor.get("args", [])]]
    return executor["image"], argv


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline")
    parser.add_argument("task")
    parser.add_argument("--root", default="/out")
    parser.add_argument("--param", action="append", default=[], help="NAME=JSON")
    parser.add_argument("--artifact", action="append", default=[], help="NAME=URI of an input artifact")
    args = parser.parse_args()
    params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    artifacts = dict(a.split("=", 1) for a in args.artifact)
    with open(args.pipeline) as fh:
        ir = yaml.safe_load(fh)
    image, argv = task_argv(ir, args.task, args.root, params, artifacts)
    sys.stdout.write("\0".join([image, *argv]) + "\0")


if __name__ == "__main__":
    main()
