"""Turn one task of a compiled KFP pipeline (IR YAML) into the command line its container runs, with
its executor input filled in: parameters from the pipeline's defaults (or --param NAME=JSON),
input artifacts from earlier tasks' output URIs under --root, outputs under --root/<task>/.

    python scripts/kfp_task.py PIPELINE.yaml TASK --root /out > argv.bin   (NUL-separated: image, argv...)

Used by scripts/check_images.sh to `podman run` a component the way the KFP launcher would call it.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


def task_argv(ir: dict, task: str, root: str, params: dict) -> tuple[str, list[str]]:
    tasks = ir["root"]["dag"]["tasks"]
    spec = tasks[task]
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
            values[name] = params.get(
                source["componentInputParameter"], defaults[source["componentInputParameter"]]
            )
        elif "runtimeValue" in source:
            values[name] = source["runtimeValue"]["constant"]
        else:
            raise SystemExit(f"{task}: parameter {name} comes from another task; pass --param {name}=JSON")

    def artifact(name: str, kind: dict, uri: str) -> dict:
        return {"artifacts": [{"name": name, "type": kind, "uri": uri, "metadata": {}}]}

    inputs = {}
    for name, source in spec.get("inputs", {}).get("artifacts", {}).items():
        producer = source["taskOutputArtifact"]
        kind = comp["inputDefinitions"]["artifacts"][name]["artifactType"]
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
    args = parser.parse_args()
    params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    with open(args.pipeline) as fh:
        ir = yaml.safe_load(fh)
    image, argv = task_argv(ir, args.task, args.root, params)
    sys.stdout.write("\0".join([image, *argv]) + "\0")


if __name__ == "__main__":
    main()
