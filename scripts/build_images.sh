#!/usr/bin/env bash
# Build the CPU images on this machine with podman (`make images`):
#   1. a Debian bookworm base from the apt mirror (debootstrap --variant=minbase), imported once as
#      $BASE_IMAGE and reused afterwards;
#   2. docker/train.Dockerfile (CPU torch) and docker/sandbox.Dockerfile on that base.
# torch: the CPU wheel of torch 2.13.0 that lies on this disk is mounted into the build (/wheels), so pip
# never takes PyPI's multi-GB CUDA build. Build-only mounts (the wheel, the host's CA bundle and pip
# config for PyPI behind this network's TLS proxy) are volumes, not layers: nothing of them is in the
# images. Caches and the rootfs live under $UNISD_IMAGE_WORK (default /var/tmp/unisd-images), not in the
# repository. The CUDA variants (train default, rollout) cannot be built here. Idempotent: a second run
# reuses the base and podman's layer cache.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/podman-env.sh
[ "$(id -u)" = 0 ] || { echo "build_images.sh: run as root (rootful podman, debootstrap)" >&2; exit 1; }
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
start_all=$(date +%s)

# --- 1. base
if podman image exists "$BASE_IMAGE"; then
  echo "== base: $BASE_IMAGE exists, reused"
else
  command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 1; }
  t0=$(date +%s)
  rootfs="$UNISD_IMAGE_WORK/rootfs-bookworm"
  rm -rf "$rootfs"
  echo "== base: debootstrap --variant=minbase bookworm from $MIRROR"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$UNISD_IMAGE_WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$UNISD_IMAGE_WORK/debootstrap.log"; exit 1; }
  # the apt sources the image will use (debootstrap writes only the main suite)
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" > "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" > /dev/null
  rm -rf "$rootfs"
  echo "== base: $BASE_IMAGE imported in $(( $(date +%s) - t0 )) s"
fi

# --- the local torch CPU wheel (pip's find-links on this machine, e.g. /opt/wheels)
wheels="$UNISD_IMAGE_WORK/wheels"
mkdir -p "$wheels"
if ! ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --dest "$wheels" torch==2.13.0
fi
ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 \
  || { echo "no torch 2.13.0+cpu wheel found (got: $(ls "$wheels"))" >&2; exit 1; }

# --- pip inside the build: PyPI through this machine's CA bundle; the local index mirrors if present
pipconf="$UNISD_IMAGE_WORK/pip.conf"
{
  echo "[global]"
  echo "cert = /etc/ssl/unisd-build-ca.pem"
  echo "timeout = 180"
  extra=""
  for index in /opt/pypi /opt/pypi-more; do [ -d "$index/simple" ] && extra="$extra file://$index/simple"; done
  [ -n "$extra" ] && echo "extra-index-url =$extra"
} > "$pipconf"
mounts=(-v "$wheels:/wheels:ro" -v "$pipconf:/etc/pip.conf:ro"
        -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/unisd-build-ca.pem:ro)
for index in /opt/pypi /opt/pypi-more; do [ -d "$index" ] && mounts+=(-v "$index:$index:ro"); done

build() {  # name dockerfile tag
  local t0 rc
  t0=$(date +%s)
  echo "== build $3 from $2 (log: $UNISD_IMAGE_WORK/build-$1.log)"
  set +e
  podman build --network=host "${mounts[@]}" \
    --build-arg BASE="$BASE_IMAGE" --build-arg TORCH_PIP_ARGS="--find-links /wheels" \
    -f "$2" -t "$3" . > "$UNISD_IMAGE_WORK/build-$1.log" 2>&1
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then tail -40 "$UNISD_IMAGE_WORK/build-$1.log"; echo "build of $3 failed" >&2; exit $rc; fi
  echo "== built $3 in $(( $(date +%s) - t0 )) s"
}
build sandbox docker/sandbox.Dockerfile "$SANDBOX_IMAGE"
build train docker/train.Dockerfile "$TRAIN_IMAGE"

echo "== images (total $(( $(date +%s) - start_all )) s)"
for image in "$BASE_IMAGE" "$SANDBOX_IMAGE" "$TRAIN_IMAGE"; do
  printf '%-40s %8s MB  torch=%s\n' "$image" \
    "$(( $(podman image inspect --format '{{.Size}}' "$image") / 1000000 ))" \
    "$( [ "$image" = "$BASE_IMAGE" ] && echo - || podman run --rm --network=none "$image" python -c 'import torch; print(torch.__version__)')"
done
