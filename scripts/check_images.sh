#!/usr/bin/env bash
# Run the images built by `make images` (`make images-check`):
#   (a) the sandbox image, run like the eval step's pod (uid 10001, read-only root, private /tmp, no
#       capabilities): unisd.sandbox inside it on a hostile program (writes outside its workdir, opens
#       sockets, forks without end) -- first with the default backend choice, then, if no isolating
#       backend works in the container, with the explicit opt-in UNISD_SANDBOX_BACKEND=rlimit and the
#       container as the boundary (--network=none); plus a grading trick through run_checked;
#   (b) two pipeline components inside the train image, exactly as compiled: `unisd compile` writes the
#       IR, scripts/kfp_task.py turns the resolve-config and prepare tasks into their container command
#       lines with an executor input, and podman runs them (data and the SmolLM2 cache mounted read-only);
#   (c) the grade component -- the one pipeline step that runs model-written code -- inside the sandbox
#       image as compiled, like its pod: no volume but the artifacts, no network, non-root, read-only root,
#       on hand-written MBPP answers (gold, wrong, hostile, gold…: scripts/grade_check_samples.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/podman-env.sh
PY=${PYTHON:-python3}
$PY -c "import unisd" 2>/dev/null || { echo "$PY cannot import unisd (make venv, or set PYTHON=)" >&2; exit 1; }
for image in "$SANDBOX_IMAGE" "$TRAIN_IMAGE"; do
  podman image exists "$image" || { echo "$image is missing: run make images first" >&2; exit 1; }
done
pod=(--rm --user 10001:10001 --read-only --tmpfs /tmp:rw,size=256m,mode=1777 --cap-drop=all
     --security-opt no-new-privileges -v "$PWD/scripts:/checks:ro")

echo "== (a) sandbox image: hostile program under unisd.sandbox, default backend choice"
podman run "${pod[@]}" "$SANDBOX_IMAGE" python /checks/sandbox_image_check.py
echo "== (a) sandbox image: explicit UNISD_SANDBOX_BACKEND=rlimit, the container as the boundary (--network=none)"
podman run "${pod[@]}" --network=none -e UNISD_SANDBOX_BACKEND=rlimit "$SANDBOX_IMAGE" \
  python /checks/sandbox_image_check.py

echo "== (b) train image: pipeline components as compiled"
out="$UNISD_IMAGE_WORK/kfp-out"
rm -rf "$out" && mkdir -p "$out" && chmod 0777 "$out"
ir="$UNISD_IMAGE_WORK/pipeline.yaml"
$PY -m unisd compile --output "$ir" --no-cluster > /dev/null
data=${UNISD_DATA_DIR:-/work/shared/data}
model_cache=${UNISD_MODEL_CACHE:-$HOME/.cache/unisd/models/smollm2-135m-instruct}
[ -d "$model_cache" ] || { echo "no SmolLM2 cache at $model_cache (unisd fetch-model smollm2-135m-instruct)" >&2; exit 1; }
for task in resolve-config-op prepare-op; do
  mapfile -d '' spec < <($PY scripts/kfp_task.py "$ir" "$task" --root /out)
  echo "-- $task: compiled for ${spec[0]}, run in $TRAIN_IMAGE"
  t0=$(date +%s)
  podman run "${pod[@]}" --network=none -v "$out:/out" -v "$data:/data:ro" \
    -v "$model_cache:/cache/unisd/models/smollm2-135m-instruct:ro" \
    -e UNISD_DATA_DIR=/data -e UNISD_CACHE_DIR=/cache/unisd -e HF_HUB_OFFLINE=1 \
    "$TRAIN_IMAGE" "${spec[@]:1}" > "$out/$task.log" 2>&1 || { tail -30 "$out/$task.log"; exit 1; }
  echo "-- $task: exit 0 in $(( $(date +%s) - t0 )) s; executor output: $(cat "$out/$task/executor_output.json" 2>/dev/null || echo none)"
done
echo "-- outputs:"; (cd "$out" && find . -type f -not -name '*.log' | sort | xargs wc -c)

echo "== (c) sandbox image: the grade component as compiled, on gold / wrong / hostile MBPP answers"
samples="$out/eval-op/samples"
rm -rf "$samples" && mkdir -p "$samples"
$PY scripts/grade_check_samples.py "$out/prepare-op/prepared" "$samples"
chmod -R a+rwX "$out"
mapfile -d '' spec < <($PY scripts/kfp_task.py "$ir" grade-op --root /out --param benchmark='"mbpp"' \
  --artifact config=/out/resolve-config-op/config --artifact prepared=/out/prepare-op/prepared \
  --artifact samples=/out/eval-op/samples)
echo "-- grade-op: compiled for ${spec[0]}, run in $SANDBOX_IMAGE"
t0=$(date +%s)
podman run "${pod[@]}" --network=none -v "$out:/out" "$SANDBOX_IMAGE" "${spec[@]:1}" \
  > "$out/grade-op.log" 2>&1 || { tail -30 "$out/grade-op.log"; exit 1; }
echo "-- grade-op: exit 0 in $(( $(date +%s) - t0 )) s"
$PY - "$out" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
results = json.loads((out / "grade-op" / "results" / "results.json").read_text())
scores = [row["score"] for row in results["per_item"]]
sandbox = results.get("sandbox") or {}
print(f"-- grade-op: scores gold, wrong, hostile, gold… = {scores}; sandbox: {json.dumps(sandbox)}")
escaped = sorted(str(p) for p in out.rglob("PWNED*"))
assert scores == [1.0, 0.0, 0.0] + [1.0] * (len(scores) - 3), scores
assert not escaped, f"the hostile answer wrote {escaped}"
print("-- grade-op: the hostile answer scored 0 and wrote nothing outside its sandbox")
PYEOF
