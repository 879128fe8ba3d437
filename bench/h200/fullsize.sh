#!/usr/bin/env bash
# One stage of the full-size H200 measurement (bench/h200/README.md). Usage: bench/h200/fullsize.sh STAGE...
set -uo pipefail
cd "$(dirname "$0")/../.."
W=/root/work; mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 OMNIEDGE_HOME=$W/home PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
# omniedge itself, editable, no dependencies fetched (the machine has no network; the image has them)
python3 -c "import omniedge.export, omniedge.bench" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
peak() { python3 - "$@" <<'PY'
import resource, subprocess, sys, time, json
t = time.perf_counter(); rc = subprocess.call(sys.argv[1:])
print(json.dumps({"rc": rc, "wall_s": round(time.perf_counter() - t, 1),
  "peak_child_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}))
sys.exit(rc)
PY
}
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    wheels)  # espeakng-loader (speech for calibration), English data only, carried as .whl/espeakng_loader-en.tar.xz
      python3 -c "import tarfile; tarfile.open('.whl/espeakng_loader-en.tar.xz').extractall('/root/site')" && \
        python3 -c "import espeakng_loader, os; print('espeakng_loader at', os.path.dirname(espeakng_loader.__file__))" ;;
    compress)
      peak python3 -m omniedge.cli compress full -o $W/full-int4 --recipe recipes/qwen3-omni-30b-prune50-int4.yaml \
        2>&1 | tee $OUT/compress.log | tail -40
      cp $W/full-int4/omniedge.json $OUT/full-int4.omniedge.json; du -sh $W/full-int4; df -h $W | tail -1 ;;
    export)
      peak python3 -m omniedge.cli export $W/full-int4 -o $W/full-bundle --device cuda 2>&1 | tee $OUT/export.log | tail -20
      cp $W/full-bundle/manifest.json $OUT/full-bundle.manifest.json; du -sh $W/full-bundle/* ;;
    reload)
      python3 - <<'PY' 2>&1 | tee $OUT/reload.log | tail -20
import time, torch
from omniedge.checkpoint import load_checkpoint
t = time.perf_counter(); model, tok = load_checkpoint("/root/work/full-int4", dtype=torch.bfloat16)
th = model.thinker.to("cuda"); print(f"loaded in {time.perf_counter() - t:.0f} s, gpu {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 151645, 198, 151644, 77091, 198]], device="cuda")
t = time.perf_counter(); out = th.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
print(f"generated {out[0, ids.shape[1]:].tolist()} in {time.perf_counter() - t:.1f} s")
PY
      ;;
    baseline)
      python3 -m omniedge.bench.baseline_hf $W/full-int4 --random-weights --device cuda --dtype bfloat16 \
        --contexts 512 4096 --new-tokens 32 --runs 2 > $OUT/baseline_grouped.json 2> $OUT/baseline.err; tail -3 $OUT/baseline.err
      python3 -m omniedge.bench.baseline_hf $W/full-int4 --random-weights --device cuda --dtype bfloat16 \
        --contexts 512 --new-tokens 32 --runs 2 --experts batched_mm > $OUT/baseline_batched.json 2>> $OUT/baseline.err
      python3 -c "import json,sys; [print(f, [(c['context'], c['token_ms'].get('p50'), c['ttft_ms'].get('mean')) for c in json.load(open(f))['contexts']]) for f in sys.argv[1:]]" $OUT/baseline_*.json ;;
    install-ort)
      mkdir -p /root/acc && cp .gpuwheels/part* /root/acc/ 2>/dev/null
      if [ -f .gpuwheels/NAME ]; then w=/root/acc/$(cat .gpuwheels/NAME); cat /root/acc/part* > $w && \
        python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site $w && \
        python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"; fi ;;
    report)
      python3 -c "import onnxruntime as o; o.preload_dlls()" && \
      python3 -m omniedge.bench.thinker_report $W/full-bundle --providers cuda --contexts 512 4096 --new-tokens 128 \
        --runs 3 --profile --json $OUT/full-report.json 2>&1 | tail -40 ;;
    fused)  # the same weights, q/k RMSNorm inside GroupQueryAttention: equal logits? faster?
      python3 - <<'PY' 2>&1 | tee $OUT/fused.log | tail -12
import json, os, shutil, numpy as np
from pathlib import Path
from omniedge.export.thinker_ort import Options, export_thinker_ort
from omniedge.weights import SafetensorsDir
src, a, b = Path("/root/work/full-int4"), Path("/root/work/full-bundle"), Path("/root/work/full-bundle-fusedqk")
b.mkdir(exist_ok=True)
for f in a.iterdir():
    if f.name not in ("thinker.onnx", "manifest.json") and not (b / f.name).exists():
        os.link(f, b / f.name)
m = json.loads((a / "manifest.json").read_text())
cfg = json.loads((src / "config.json").read_text())
export_thinker_ort(SafetensorsDir(src), cfg, b / "thinker.onnx", m["text"]["num_deepstack"],
                   Options(dtype="float16", fused_qk_norm=True), progress=False, data_of=a / "thinker.onnx")
from omniedge.export.onnx_io import component_record
m["components"]["thinker"] = component_record(b / "thinker.onnx", b)
m["thinker_graph"].update(fused_qk_norm=True, providers=["CUDAExecutionProvider"])
(b / "manifest.json").write_text(json.dumps(m))
from omniedge.runtime.app import Omni
outs = []
for d in (a, b):
    o = Omni.load(d, providers="cuda", max_context=1024)
    rng = np.random.default_rng(0); ids = rng.integers(0, o.embed_table.shape[0], 256)
    x = np.asarray(o.embed_table[ids], np.float32)[None]
    first = o.thinker.prefill(x, np.broadcast_to(np.arange(256), (3, 256)), np.zeros((3, 1, 256, x.shape[-1]), np.float32))
    l1 = first.logits(); l2 = o.thinker.decode(o.embed_table[first.greedy()], 256).logits()
    outs.append((l1, l2)); o.close()
for k, name in enumerate(("prefill", "decode")):
    r, f = outs[0][k], outs[1][k]
    print(name, "fused vs separate: max|diff|/max|ref|", float(np.abs(f - r).max() / np.abs(r).max()), "argmax", int(r.argmax()), int(f.argmax()))
PY
      python3 -m omniedge.bench.thinker_report /root/work/full-bundle-fusedqk --providers cuda --contexts 512 --new-tokens 64 \
        --runs 2 --json $OUT/fused-report.json 2>&1 | tail -8 ;;
    parity)
      python3 -m omniedge.bench.parity check bench/h200/data/mini-gpu bench/h200/data/ref.npz --providers cuda \
        --json $OUT/parity.json 2>&1 | tail -5 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
