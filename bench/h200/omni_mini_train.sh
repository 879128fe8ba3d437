#!/usr/bin/env bash
# Train omni-mini on the H200 machine (docs/omni-mini.md "Training"), one device call at a time:
#   run tool, carry [".ompack", ".whl"]:   bash bench/h200/omni_mini_train.sh            (call 1)
#                                            RESUME=1 bash bench/h200/omni_mini_train.sh   (calls 2, 3, ...)
# The run stops before DEADLINE seconds (default 540, inside the 600-second call), keeps its state in
# /root/work/omni-mini-state (kept only while the machine stays warm between calls) and exits 3: run it
# again with RESUME=1, which refuses to start afresh (exit 4) if the machine lost the state. Exit 0: the
# model is in $OUT/omni-mini (comes back), with the log in $OUT/train.log. .ompack: `python -m omniedge.training.train pack DATASET .ompack` made here;
# .whl/espeakng_loader-en.tar.xz: `python -m omniedge.data.espeak_payload .whl/espeakng_loader-en.tar.xz`.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=${W:-/root/work}      # kept between calls while the machine stays warm
SITE=${SITE:-/root/site}  # where the carried espeak-ng and this tree's omniedge are installed
mkdir -p "$W" "$SITE" "${OUT:=$W/out}"
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 OMNIEDGE_HOME=$W/home PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
if [ "${RESUME:-0}" = 1 ] && [ ! -f "$W/omni-mini-state/state.json" ]; then
  echo "RESUME=1 but no run state in $W/omni-mini-state: this is a fresh machine; start again without RESUME"
  exit 4
fi
[ -d "$SITE/espeakng_loader" ] ||
  python3 -c "import sys, tarfile; tarfile.open('.whl/espeakng_loader-en.tar.xz').extractall(sys.argv[1])" "$SITE"
# omniedge itself, from this tree, no dependencies fetched (the machine has no network; its image has them)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" . >/dev/null 2>&1 ||
  echo "omniedge install failed"
python3 -c "from omniedge.data import espeak; assert espeak.available(), 'espeak-ng does not speak'" || exit 2
ready=$(($(date +%s) - t0))
echo "=== $(date -u +%H:%M:%S) setup ${ready}s; nproc $(nproc); /dev/shm $(df -h /dev/shm | awk 'NR==2 {print $4}') free"
python3 -m omniedge.training.train train .ompack -o "$W/omni-mini" --state "$W/omni-mini-state" --device cuda \
  --deadline $((${DEADLINE:-540} - ready)) --loader-workers "${WORKERS:-14}" "$@" 2>&1 |
  tee -a "$W/train.log" | tr '\r' '\n' | grep -v "step/s\]$" | tail -40
rc=${PIPESTATUS[0]}
cp "$W/train.log" "$OUT/train.log"
[ "$rc" = 0 ] && cp -r "$W/omni-mini" "$OUT/omni-mini" && ls -la "$OUT/omni-mini"
echo "=== $(date -u +%H:%M:%S) exit $rc (3: paused, run again with RESUME=1; 0: done)"
exit "$rc"
