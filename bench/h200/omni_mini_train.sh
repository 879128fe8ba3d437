#!/usr/bin/env bash
# Train omni-mini on the H200 machine (docs/omni-mini.md "Training"), one device call at a time:
#   run tool, carry [".ompack", ".whl"]:   bash bench/h200/omni_mini_train.sh
# The same command in every call. The run stops before DEADLINE seconds of training (default 540, inside
# the 600-second call), keeps its state in /root/work/omni-mini-state (kept while the machine stays warm
# between calls) and exits 3: run it again. Exit 0: the model is in $OUT/omni-mini (comes back), with the
# log in $OUT/train.log. .ompack: `python -m omniedge.training.train pack DATASET .ompack` made here;
# .whl/espeakng_loader-en.tar.xz: `python -m omniedge.data.espeak_payload .whl/espeakng_loader-en.tar.xz`.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=/root/work
mkdir -p "$W" /root/site "${OUT:=$W/out}"
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 OMNIEDGE_HOME=$W/home PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
[ -d /root/site/espeakng_loader ] ||
  python3 -c "import tarfile; tarfile.open('.whl/espeakng_loader-en.tar.xz').extractall('/root/site')"
# omniedge itself, from this tree, no dependencies fetched (the machine has no network; its image has them)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /root/site . >/dev/null 2>&1 ||
  echo "omniedge install failed"
python3 -c "from omniedge.data import espeak; assert espeak.available(), 'espeak-ng does not speak'" || exit 2
ready=$(($(date +%s) - t0))
echo "=== $(date -u +%H:%M:%S) setup ${ready}s; nproc $(nproc)"
python3 -m omniedge.training.train train .ompack -o "$W/omni-mini" --state "$W/omni-mini-state" --device cuda \
  --deadline $((${DEADLINE:-540} - ready)) --loader-workers "${WORKERS:-14}" "$@" 2>&1 |
  tee -a "$W/train.log" | tr '\r' '\n' | grep -v "step/s\]$" | tail -40
rc=${PIPESTATUS[0]}
cp "$W/train.log" "$OUT/train.log"
[ "$rc" = 0 ] && cp -r "$W/omni-mini" "$OUT/omni-mini" && ls -la "$OUT/omni-mini"
echo "=== $(date -u +%H:%M:%S) exit $rc (3: paused, run the same command again; 0: done)"
exit "$rc"
