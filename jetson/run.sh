#!/usr/bin/env bash
# Run omniedge in the L4T container on a Jetson AGX Orin, with the GPU, host networking (for the local
# server), the bundles directory and the cache mounted. Any arguments are passed to `omniedge`.
#
#   jetson/run.sh info /bundles/omni
#   jetson/run.sh bench /bundles/omni --json /bundles/bench-orin.json
#   BUNDLES=/data/omniedge jetson/run.sh run /bundles/omni --prompt "What do you see?" --image /bundles/cam.jpg
set -euo pipefail

IMAGE=${OMNIEDGE_IMAGE:-omniedge:r36.4}
BUNDLES=${BUNDLES:-$HOME/omniedge-bundles}
CACHE=${OMNIEDGE_CACHE:-$HOME/.cache/omniedge}

if [ ! -e /etc/nv_tegra_release ]; then
  echo "jetson/run.sh: this is not a Jetson (no /etc/nv_tegra_release); on a host use \`omniedge\` directly" >&2
  exit 2
fi
if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "jetson/run.sh: image $IMAGE not found; build it first:" >&2
  echo "  docker build -f Dockerfile.l4t -t $IMAGE ." >&2
  exit 2
fi
mkdir -p "$BUNDLES" "$CACHE"

tty_flags=()
[ -t 0 ] && tty_flags=(-it)

exec docker run --rm "${tty_flags[@]}" \
  --runtime nvidia \
  --network host \
  --ipc host \
  -v "$BUNDLES":/bundles \
  -v "$CACHE":/var/cache/omniedge \
  -v /run/jtop.sock:/run/jtop.sock:ro \
  "$IMAGE" "$@"
