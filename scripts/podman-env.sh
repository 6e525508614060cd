# Sourced by build_images.sh and check_images.sh: podman settings that work on the development machine
# (docs/deploy.md "Building the images here"), kept out of /etc and out of the repository.
#   runc, not crun (crun fails on this kernel's hybrid cgroups); cgroupfs; no default ulimits (raising
#   RLIMIT_NPROC is not permitted here).
UNISD_IMAGE_WORK=${UNISD_IMAGE_WORK:-/var/tmp/unisd-images}
mkdir -p "$UNISD_IMAGE_WORK"
if [ -z "${CONTAINERS_CONF:-}" ]; then
  CONTAINERS_CONF="$UNISD_IMAGE_WORK/containers.conf"
  printf '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
    > "$CONTAINERS_CONF"
  export CONTAINERS_CONF
fi
UNISD_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE=${UNISD_BASE_IMAGE:-localhost/debian-base:bookworm}
TRAIN_IMAGE=${UNISD_TRAIN_CPU_IMAGE:-localhost/unisd-train:$UNISD_VERSION-cpu}
SANDBOX_IMAGE=${UNISD_SANDBOX_IMAGE:-localhost/unisd-sandbox:$UNISD_VERSION}
command -v podman >/dev/null || { echo "podman is not installed (apt-get install -y podman buildah runc debootstrap)" >&2; exit 1; }
