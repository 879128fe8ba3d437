#!/usr/bin/env bash
# An omni-mini fine-tune that runs on in the background across device calls (docs/omni-mini.md "Fine-tune"),
# so that later calls can carry other things meanwhile. Usage: bench/h200/omni_mini_finetune.sh STAGE [ARGS...]
#   start ARGS...  copy this tree (+ .ompack, .whl) to /root/work/ft/repo, start omni_mini_train.sh ARGS there
#                  (--init /root/work/ft/init: the tree's omni-mini weights, copied first) and return
#   wait           wait for it (WAIT_S, default 480), score the result and the weights it started from on
#                  .evalpack (a training pack of the test split: python -m omniedge.training.train pack DATASET
#                  .evalpack --splits train,test ...) on the GPU, and bring the model back in 15 MB pieces
set -uo pipefail
cd "$(dirname "$0")/../.."
W=/root/work/ft
mkdir -p "$W" "${OUT:=$W/out-call}"
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 OMNIEDGE_HOME=/root/work/home PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
stage=${1:?stage}; shift
case $stage in
  start)
    rm -rf "$W/repo" "$W/init" "$W/out" "$W/train" "$W/rc" && mkdir -p "$W/repo" "$W/init"
    tar --exclude=.gpuwheels --exclude=.git -cf - . | tar -C "$W/repo" -xf -
    cp omniedge/models/omni_mini/* "$W/init/"
    args=$(printf '%q ' "$@")
    cd "$W/repo" && setsid nohup bash -c "W=$W/train OUT=$W/out DEADLINE=3000 bash bench/h200/omni_mini_train.sh --init $W/init $args \
      > $W/run.log 2>&1; echo \$? > $W/rc" > /dev/null 2>&1 < /dev/null &
    sleep ${START_WAIT:-45}; tail -5 "$W/run.log" ;;
  wait)
    for _ in $(seq 1 $((${WAIT_S:-480} / 5))); do [ -f "$W/rc" ] && break; sleep 5; done
    echo "fine-tune rc $(cat "$W/rc" 2>/dev/null || echo running)"; tail -25 "$W/run.log"
    cp "$W/run.log" "$OUT/finetune.log"
    [ "$(cat "$W/rc" 2>/dev/null)" = 0 ] || exit 1
    for m in init out/omni-mini; do
      python3 -m omniedge eval "$W/$m" --suite "$W/repo/.evalpack" --device ${EVAL_DEVICE:-cuda} --json "$OUT/eval-${m##*/}.json" 2>&1 |
        grep -v Warn | grep -A6 "^task"
      python3 -c "import json,sys; print({k: round(v['value'], 3) for k, v in json.load(open(sys.argv[1]))['tasks']['mixed']['by_kind'].items()})" "$OUT/eval-${m##*/}.json"
    done
    tar -C "$W/out" -cf - omni-mini | split -b 15000000 - "$OUT/omni-mini.tar." && ls -la "$OUT" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
