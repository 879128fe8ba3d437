#!/usr/bin/env bash
# Stages of the full-size H200 measurement (bench/h200/README.md). Usage: bench/h200/fullsize.sh STAGE...
# Big outputs stay in /root/work (kept while the machine stays warm between calls); what comes back goes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
W=/root/work
# VARIANT=head: the recipe with an INT4 lm_head (recipes/qwen3-omni-30b-prune50-int4-head.yaml), in its own dirs
SFX=${VARIANT:+-$VARIANT}
RECIPE=qwen3-omni-30b-prune50-int4$SFX.yaml CKPT=$W/full-int4$SFX BUNDLE=$W/full-bundle$SFX
mkdir -p "$W" "$OUT" /root/site
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 OMNIEDGE_HOME=$W/home PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
export OMNIEDGE_OPS_DIR=$W/lib  # where moe-build puts the MoEInt4 library and the runtime finds it
# omniedge itself, from this tree, no dependencies fetched (the machine has no network; its image has them)
# SKIP_INSTALL=1: keep the installed copy (a background job of an earlier call may be importing from it)
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /root/site . \
  >/dev/null 2>&1 || echo "omniedge install failed"
om() { python3 -m omniedge "$@"; }
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    wheels)  # espeakng-loader (speech for calibration), English data only, carried as .whl/espeakng_loader-en.tar.xz
      python3 -c "import tarfile; tarfile.open('.whl/espeakng_loader-en.tar.xz').extractall('/root/site')" &&
        python3 -c "from omniedge.data import espeak; print('espeak-ng in process:', espeak.available())" &&
        python3 -c "import json; from omniedge.data.scenes import load_photo as L; p=json.load(open('omniedge/compress/calibration-pack/pack.json'));
n=sorted({e['image']['photo'] for s in p['splits'].values() for e in s if e['kind']=='image' and 'photo' in e['image']}); [L(x) for x in n]; print('photos ok', len(n))" ;;
    keep-ortinclude)  # ONNX Runtime's C header kept on the machine for a later call's moe-build
      rm -rf $W/ortinclude && cp -r .ortinclude $W/ortinclude && ls $W/ortinclude ;;
    chunk)  # one chunk of the onnxruntime-gpu wheel, joined by install-ort
      mkdir -p /root/acc && cp .gpuwheels/part* /root/acc/ && ls /root/acc ;;
    stash-mini)  # omni-mini's float16 bundle and the greedy reference, made on the CPU (make_parity_data.py)
      mkdir -p $W/mini && cp -r bench/h200/data/mini-gpu bench/h200/data/ref.npz $W/mini/ 2>/dev/null; ls $W/mini ;;
    start-compress)  # runs on in its own session across calls (it may outlast one call); status/wait-compress follow it
      rm -f $W/compress.rc
      setsid nohup bash -c "python3 -m omniedge compress full -o $W/full-int4 --recipe recipes/qwen3-omni-30b-prune50-int4.yaml \
        > $W/compress.log 2>&1; echo \$? > $W/compress.rc" > /dev/null 2>&1 < /dev/null &
      sleep 45; tail -c 1500 $W/compress.log; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv ;;
    start-pipeline)  # compress then export, in their own session: they run on while later calls carry wheel chunks
      rm -f $W/pipeline$SFX.rc; rm -rf $W/recipes; cp -r recipes $W/recipes
      cat > $W/pipeline$SFX.sh <<EOF
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 OMNIEDGE_HOME=$W/home PYTHONPATH=/root/site
cd $W
python3 -m omniedge compress full -o $CKPT --recipe $W/recipes/$RECIPE > $W/compress$SFX.log 2>&1 || { echo 1 > $W/pipeline$SFX.rc; exit; }
python3 - > $W/export$SFX.log 2>&1 <<'PY'
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call([sys.executable, "-m", "omniedge", "export", "$CKPT", "-o", "$BUNDLE", "--device", "cuda"])
r = {"rc": rc, "wall_s": round(time.perf_counter() - t, 1), "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
print(json.dumps(r)); json.dump(r, open("$W/export-run$SFX.json", "w"))
PY
echo \$? > $W/pipeline$SFX.rc
EOF
      setsid nohup bash $W/pipeline$SFX.sh > /dev/null 2>&1 < /dev/null &
      sleep 20; tail -c 600 $W/compress$SFX.log | tr '\r' '\n' | tail -3 ;;
    wait-pipeline)
      for _ in $(seq 1 ${WAIT_STEPS:-100}); do [ -f $W/pipeline$SFX.rc ] && break; sleep 3; done
      echo "pipeline$SFX rc $(cat $W/pipeline$SFX.rc 2>/dev/null || echo running)"
      tr '\r' '\n' < $W/compress$SFX.log | grep -v "it/s\]$" | tail -4; tr '\r' '\n' < $W/export$SFX.log | grep -v "it/s\]$" | tail -25
      cp $W/compress$SFX.log $W/export$SFX.log $OUT/ 2>/dev/null; cp $CKPT/omniedge.json $OUT/full-int4$SFX.omniedge.json 2>/dev/null
      cp $BUNDLE/manifest.json $OUT/full-bundle$SFX.manifest.json 2>/dev/null; cp $W/export-run$SFX.json $OUT/ 2>/dev/null ;;
    sweep)
      timeout 420 python3 bench/h200/kernel_sweep.py $W/full-bundle --contexts 512 4096 --new-tokens 64 --runs 2 \
        --combine "fpA_intB + XQA=ORT_FPA_INTB_GEMM=1,ORT_ENABLE_XQA=1" --json $OUT/sweep.json 2>&1 | grep -v Warn ;;
    chunked)  # the memory a prompt's workspaces take, whole against in pieces (OrtThinker.prefill_chunk)
      timeout 400 python3 bench/h200/kernel_sweep.py $BUNDLE --contexts ${CONTEXTS:-512 4096} --new-tokens 64 --runs 2 \
        --only "runtime defaults" "prompts in 512-token pieces" "prompts in 1024-token pieces" \
        --json $OUT/sweep-chunked$SFX.json 2>&1 | grep -v Warn ;;
    rounds)  # kernel choices A/B in interleaved rounds, each variant its own process (kernel_sweep.py --rounds)
      timeout ${SWEEP_TIMEOUT:-560} python3 bench/h200/kernel_sweep.py $BUNDLE --contexts 512 4096 --new-tokens 64 --runs 2 \
        --rounds ${ROUNDS:-3} --only "runtime defaults" "small-N GEMV (the router)" \
        "cuBLAS GEMM auto-tune (timed in graph replay)" \
        --json $OUT/sweep-rounds$SFX.json 2>&1 | grep -v Warn ;;
    router-probe)  # the router's matmul alone in each form the CUDA provider can run (bench/h200/router_probe.py)
      timeout 200 python3 bench/h200/router_probe.py --json $OUT/router-probe.json 2>&1 | grep -v Warn | tail -6 ;;
    steps)  # a decode step's host share: step vs replay vs queued replays (bench/h200/step_probe.py)
      timeout 200 python3 bench/h200/step_probe.py $BUNDLE $OUT/step-probe$SFX.json 2>&1 | grep -v Warn | tail -3 ;;
    final)  # the report with the runtime's own settings (omniedge/runtime/ort_cuda.py), then omni-mini parity
      timeout 300 python3 -m omniedge.bench.thinker_report $BUNDLE --providers cuda --contexts 512 4096 \
        --new-tokens 128 --runs 3 --profile --json $OUT/full-report$SFX.json 2>&1 | grep -v Warn | tail -14
      timeout 100 python3 -m omniedge.bench.parity check $W/mini/mini-gpu $W/mini/ref.npz --providers cuda \
        --json $OUT/parity.json 2>&1 | tail -3 ;;
    status)
      tail -c 600 $W/compress.log 2>/dev/null | tr '\r' '\n' | tail -4; cat $W/compress.rc 2>/dev/null; df -h $W | tail -1 ;;
    wait-compress)
      for _ in $(seq 1 110); do [ -f $W/compress.rc ] && break; sleep 5; done
      tr '\r' '\n' < $W/compress.log | grep -v "it/s\]$" | tail -30; echo "rc $(cat $W/compress.rc 2>/dev/null)"
      cp $W/compress.log $OUT/compress.log 2>/dev/null; cp $W/full-int4/omniedge.json $OUT/full-int4.omniedge.json 2>/dev/null
      cp $W/full-int4/config.json $OUT/full-int4.config.json 2>/dev/null; du -sh $W/full-int4; ls -la $W/full-int4 | head -20 ;;
    reload)
      timeout 300 python3 - <<'PY' 2>&1 | tee $OUT/reload.log | grep -v Warn | tail -6
import time, torch
from omniedge.checkpoint import load_checkpoint
t = time.perf_counter(); model, tok = load_checkpoint("/root/work/full-int4", dtype=torch.bfloat16)
th = model.thinker.to("cuda"); print(f"loaded in {time.perf_counter() - t:.0f} s, gpu {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 151645, 198, 151644, 77091, 198]], device="cuda")
t = time.perf_counter(); out = th.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
print(f"generated {out[0, ids.shape[1]:].tolist()} in {time.perf_counter() - t:.1f} s")
PY
      ;;
    export)
      python3 - <<'PY' 2>&1 | tee $OUT/export.log | grep -v Warn | tail -12
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call([sys.executable, "-m", "omniedge", "export", "/root/work/full-int4", "-o", "/root/work/full-bundle", "--device", "cuda"])
r = {"rc": rc, "wall_s": round(time.perf_counter() - t, 1), "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
print(json.dumps(r)); json.dump(r, open("/root/work/export-run.json", "w"))
PY
      cp $W/export-run.json $OUT/ 2>/dev/null; cp $W/full-bundle/manifest.json $OUT/full-bundle.manifest.json 2>/dev/null
      ls -la $W/full-bundle ;;
    install-ort)
      cp .gpuwheels/part* /root/acc/ 2>/dev/null
      w=/root/acc/$(cat .gpuwheels/NAME) && cat /root/acc/part* > $w &&
        python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site $w &&
        python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())" ;;
    diag)  # CPU vs CUDA provider, node by node, on omni-mini's float16 thinker
      python3 bench/h200/diag_ops.py $W/mini/mini-gpu/thinker.onnx 2>&1 | grep -v "GEMM config" | tail -14 ;;
    parity)
      python3 -m omniedge.bench.parity check $W/mini/mini-gpu $W/mini/ref.npz --providers cuda --json $OUT/parity.json 2>&1 | tail -3 ;;
    report)
      timeout ${REPORT_TIMEOUT:-560} python3 -m omniedge.bench.thinker_report $BUNDLE --providers cuda --contexts 512 4096 \
        --new-tokens 128 --runs 3 ${PROFILE---profile} --json $OUT/full-report$SFX.json 2>&1 | grep -v Warn | tail -30 ;;
    report-nograph)
      timeout 300 python3 -m omniedge.bench.thinker_report $W/full-bundle --providers cuda --contexts 512 --new-tokens 64 \
        --runs 2 --no-cuda-graph --json $OUT/full-report-nograph.json 2>&1 | grep -v Warn | tail -12 ;;
    baseline)
      timeout 400 python3 -m omniedge.bench.baseline_hf $W/full-int4 --random-weights --device cuda --dtype bfloat16 \
        --contexts 512 4096 --new-tokens 16 --runs 1 > $OUT/baseline.json 2> $OUT/baseline.err; tail -3 $OUT/baseline.err
      python3 -c "import json; r=json.load(open('$OUT/baseline.json')); print([(c['context'], c['token_ms'].get('p50'), c['ttft_ms'].get('mean')) for c in r['contexts']], r['peak_gpu_mib'])" ;;
    fused)  # the same weights, q/k RMSNorm inside GroupQueryAttention: equal logits? faster?
      timeout 400 python3 bench/h200/graph_variant.py $W/full-int4 $W/full-bundle $W/full-bundle-fusedqk --qk-norm fused \
        2>&1 | tee $OUT/fused.log | tail -6
      timeout 200 python3 -m omniedge.bench.thinker_report $W/full-bundle-fusedqk --providers cuda --contexts 512 \
        --new-tokens 64 --runs 2 --json $OUT/fused-report.json 2>&1 | grep -v Warn | tail -8 ;;
    moe-probe)  # omniedge's fused INT4 MoE kernels alone: exact, decode variants (MOE_VARIANTS), then 48 layers
      # against the roofline and QMoE; the fastest variant's macros kept for moe-build ($W/moe-defines)
      timeout 400 python3 bench/h200/moe_kernel_probe.py --json $OUT/moe-probe${PROBE_TAG:-}.json \
        $(cat $W/moe-defines 2>/dev/null) ${MOE_VARIANTS:+--variants $MOE_VARIANTS} 2>&1 | grep -v Warn | tail -24
      [ -z "${MOE_VARIANTS:-}" ] || python3 -c "import json; print(' '.join('--define ' + d for d in \
        json.load(open('$OUT/moe-probe${PROBE_TAG:-}.json'))['best_defines']))" > $W/moe-defines
      cat $W/moe-defines 2>/dev/null ;;
    moe-build)  # the op library (carry .ortinclude: ONNX Runtime's C header) and the bundle with MoEInt4 over the
      # same weights file, its logits against QMoE's on one prompt (graph_variant.py)
      # (a wheel-chunk call cannot carry the header beside its chunk: keep-ortinclude copied it to $W earlier)
      inc=.ortinclude; [ -d $inc ] || inc=$W/ortinclude
      python3 kernels/moe_int4/build.py --ort-include $inc --arch 90 $(cat $W/moe-defines 2>/dev/null) \
        -o $W/lib/libomniedge_moe_int4.so &&
      timeout 300 python3 bench/h200/graph_variant.py $CKPT $BUNDLE $BUNDLE-moe \
        --moe-kernel omniedge --json $OUT/moe-variant$SFX.json 2>&1 | grep -v Warn | tail -4 ;;
    moe-sweep)  # decode/TTFT of the two bundles in interleaved rounds (kernel_sweep.py), each its own process
      timeout ${SWEEP_TIMEOUT:-420} python3 bench/h200/kernel_sweep.py $BUNDLE --contexts 512 4096 \
        --new-tokens 64 --runs 2 --rounds ${ROUNDS:-3} --only "runtime defaults" \
        --combine "omniedge MoE kernel=@bundle=$BUNDLE-moe" --json $OUT/sweep-moe$SFX.json 2>&1 | grep -v Warn ;;
    moe-report)  # the MoEInt4 bundle's full report with ONNX Runtime's profile (where the time goes now)
      timeout ${REPORT_TIMEOUT:-400} python3 -m omniedge.bench.thinker_report $BUNDLE-moe \
        --providers cuda --contexts 512 4096 --new-tokens 128 --runs 3 --profile --json $OUT/full-report-moe$SFX.json \
        2>&1 | grep -v Warn | tail -30 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
