"""The `omniedge` command: one subcommand per stage, each a thin shell over a library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from omniedge.distill.cli import EPILOG as DISTILL_EPILOG
from omniedge.distill.cli import add_arguments as add_distill_arguments
from omniedge.errors import OmniedgeError
from omniedge.runtime.memory import BUDGET_HELP

EPILOGS = {
    "compress": "example:\n  omniedge compress tiny -o out/tiny-int4 --keep-ratio 0.5\n"
    "  omniedge compress out/tiny-int4 --report          # per layer: experts kept, saliency, errors\n"
    "  omniedge compress ./Qwen3-Omni-30B-A3B-Instruct -o out/omni-int4 "
    "--recipe recipes/qwen3-omni-30b-prune50-int4.yaml\n"
    "  omniedge compress full -o out/full-int4 --recipe recipes/qwen3-omni-30b-prune50-int4.yaml\n"
    "  omniedge compress omni-mini -o out/mini-kd-int4 --recipe recipes/omni-mini-prune50-distill-int4.yaml\n"
    "      # prune -> distill -> INT4: three passes (docs/compress.md); a re-run resumes the distillation",
    "export": "example:\n  omniedge export out/tiny-int4 -o out/tiny-bundle\n"
    "  omniedge export out/omni-int4 -o out/omni-gpu --device cuda      # float16, for onnxruntime-gpu",
    "build": "example (on the Jetson, inside the L4T container):\n  omniedge build out/omni-bundle",
    "run": "example:\n  omniedge run --prompt 'What do you see and hear?' --image cat.png --audio question.wav",
    "bench": "example:\n  omniedge bench                    # default model, built and cached on first use\n"
    "  omniedge bench out/omni-bundle --runs 10 --json bench/results/orin.json",
    "info": "example:\n  omniedge info out/tiny-int4\n  omniedge info out/tiny-bundle\n"
    "  omniedge info out/omni-bundle --memory-budget 6GB     # what stays resident, the context that fits",
    "serve": "example:\n  omniedge serve                    # default model on http://127.0.0.1:8000/v1\n"
    "  omniedge serve out/omni-bundle --memory-budget 24GB --media-root /bundles/media",
    "distill": DISTILL_EPILOG,
    "eval": "example:\n  omniedge eval omni-mini --json eval.json\n"
    "  omniedge eval --compare omni-mini out/mini-int4      # retention table, student / teacher",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omniedge",
        description="Compress, export and serve Qwen3-Omni on a Jetson AGX Orin.",
    )
    p.add_argument("--version", action="version", version=f"omniedge {__import__('omniedge').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_.replace("%", "%%"),  # the subcommand list %-formats help strings, not descriptions
            description=help_,
            epilog=EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    c = cmd(
        "compress",
        "Prune MoE experts (calibrated on real inputs) and quantize to INT4: checkpoint -> checkpoint.",
    )
    c.add_argument(
        "model",
        help="HF checkpoint directory, a built-in name (`tiny`, `omni-mini`), or a random source of the real "
        "config (`full`: all 48 layers, made on the device; `full-ci`: the same structure at CI size)",
    )
    c.add_argument("-o", "--out", type=Path, help="output checkpoint directory")
    c.add_argument(
        "--recipe",
        type=Path,
        help="YAML/JSON recipe (list of stages: prune, distill, quantize); default: prune 25%% (REAP) + INT4",
    )
    c.add_argument(
        "--report",
        action="store_true",
        help="print each layer's kept experts, saliency distribution and reconstruction error (after "
        "compressing; without -o: of the compressed checkpoint MODEL)",
    )
    c.add_argument(
        "--keep-ratio", type=float, help="fraction of experts kept per layer (overrides the recipe)"
    )
    c.add_argument("--no-quantize", action="store_true", help="skip the INT4 stage")
    c.add_argument("--samples", type=int, help="calibration requests (overrides calibration.samples)")

    e = cmd(
        "export",
        "Export a checkpoint to ONNX graphs per modality plus a manifest: checkpoint -> engine bundle.",
    )
    e.add_argument("checkpoint", help="checkpoint directory (from `omniedge compress`), or `tiny`")
    e.add_argument("-o", "--out", required=True, type=Path, help="output bundle directory")
    e.add_argument("--image-size", type=int, help="square image side the vision graph is built for")
    e.add_argument(
        "--flavour",
        choices=("ort", "portable"),
        default="ort",
        help="thinker graph: ort = ONNX Runtime contrib ops, KV cache in place (default); portable = standard "
        "ops for TensorRT",
    )
    e.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="what runs the bundle: cpu = float32 graphs; cuda = float16 thinker (ONNX Runtime's CUDA provider)",
    )
    e.add_argument(
        "--qk-norm",
        choices=("fused", "separate"),
        help="ort thinker: fused = GroupQueryAttention applies the q/k RMSNorm (CUDA only; the default for "
        "--device cuda: q, k, v stay one packed tensor, 97 fewer kernels per token); separate = their own nodes "
        "(the only choice for --device cpu)",
    )
    e.add_argument(
        "--moe-kernel",
        choices=("qmoe", "omniedge"),
        default="qmoe",
        help="ort thinker's INT4 MoE layers: qmoe = ONNX Runtime's QMoE (default); omniedge = omniedge's fused "
        "op (the runtime then needs its library: kernels/moe_int4/README.md)",
    )

    b = cmd("build", "Build TensorRT engines from a bundle's ONNX graphs (run on the target GPU).")
    b.add_argument("bundle", type=Path, help="engine bundle directory (from `omniedge export`)")

    r = cmd("run", "Answer one request (text, optional image and audio) with a bundle, streaming tokens.")
    r.add_argument("bundle", nargs="?", help="engine bundle directory; default: the built-in default model")
    r.add_argument("-p", "--prompt", default="Describe what you see and hear.", help="the user's text")
    r.add_argument("--image", type=Path, help="image file (PNG, JPEG, ...)")
    r.add_argument("--audio", type=Path, help="audio file (WAV; FLAC/OGG with soundfile installed)")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--system", help="system prompt (default: none)")
    r.add_argument(
        "--providers",
        help="onnxruntime execution providers: cpu (default), cuda, trt, auto (best available), or a comma list",
    )

    n = cmd(
        "bench",
        "Measure load time, time to first token, per-token latency, image latency, speech RTF, memory.",
    )
    n.add_argument("bundle", nargs="?", help="engine bundle directory; default: the built-in default model")
    n.add_argument("--runs", type=int, default=5, help="timed repetitions per measurement")
    n.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per generation run")
    n.add_argument("--json", type=Path, help="where to write the JSON report (default: print path in cache)")
    n.add_argument("--providers", help="onnxruntime execution providers, as for `omniedge run`")
    n.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        help="also decode after prompts of these many tokens (decode at depth)",
    )
    n.add_argument(
        "--baseline",
        type=Path,
        help="checkpoint the bundle came from: transformers decodes it at --contexts in the same run (ratio)",
    )
    n.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A", "B"),
        help="print two bench JSON reports side by side, B / A",
    )

    i = cmd("info", "Describe a checkpoint or an engine bundle and check it for damage (as `run` would).")
    i.add_argument("path", type=Path)
    i.add_argument("--memory-budget", help=f"print the bundle's memory plan for this budget: {BUDGET_HELP}")
    i.add_argument("--pin", action="append", help="engine kept resident (repeat; default: thinker)")
    i.add_argument("--max-context", type=int, help="context to plan for (default: what the budget fits)")
    i.add_argument("--providers", help="onnxruntime execution providers the plan is for (default: cpu)")

    s = cmd("serve", "Serve a bundle over a local OpenAI-style HTTP API (chat completions, streaming).")
    s.add_argument("bundle", nargs="?", help="engine bundle directory; default: the built-in default model")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--memory-budget", help=f"one budget for every engine and the KV cache: {BUDGET_HELP}")
    s.add_argument(
        "--pin", action="append", help="engine kept resident under the budget (repeat; default: thinker)"
    )
    s.add_argument(
        "--max-context", type=int, help="context tokens (default: the model's, or what the budget fits)"
    )
    s.add_argument(
        "--prefill-chunk",
        type=int,
        help="feed prompts to the thinker in pieces of this many tokens: on the CPU its workspaces then scale "
        "with the piece, not the prompt (ort bundles; default: whole prompts on the CPU; on CUDA leave it off: "
        "the runtime cuts prompts into pieces of fixed lengths there, which this replaces)",
    )
    s.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get HTTP 429")
    s.add_argument(
        "--max-request-mb", type=float, default=16.0, help="largest request body in MiB (413 above)"
    )
    s.add_argument(
        "--media-root",
        action="append",
        type=Path,
        default=[],
        help="directory local media paths may point into",
    )
    s.add_argument("--providers", help="onnxruntime execution providers, as for `omniedge run`")
    s.add_argument("--model-name", help="model id clients send (default: the bundle's model name)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    i.add_argument(
        "--no-checksums", action="store_true", help="skip hashing the bundle's files (fast on a 30B bundle)"
    )

    add_distill_arguments(
        cmd(
            "distill",
            "Distil a teacher into a student (CE + T^2 KL, top-k or on the fly): checkpoint -> checkpoint.",
        )
    )

    v = cmd(
        "eval",
        "Score a checkpoint on the held-out suite: text perplexity, image accuracy, speech WER (95% CIs).",
    )
    v.add_argument("model", nargs="?", help="checkpoint directory, or `omni-mini`")
    v.add_argument(
        "--suite",
        default="omni-mini",
        help="omni-mini (default), omni-mini-small, a data set directory, or a training pack (its test split if packed, else val)",
    )
    v.add_argument("--compare", nargs=2, metavar=("TEACHER", "STUDENT"), help="print the retention table")
    v.add_argument("--json", type=Path, help="write every number as JSON")
    v.add_argument("--device", default="cpu", help="cpu or cuda")
    v.add_argument(
        "--limit", type=int, help="only the first N test examples of each task (quicker; wider intervals)"
    )
    return p


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "compress":
        from omniedge.compress.pipeline import compress_cli

        if args.out is None and not args.report:
            raise OmniedgeError(
                "compress needs an output directory", "add -o OUT (or --report to inspect MODEL)"
            )
        if args.out is not None:
            compress_cli(
                args.model,
                args.out,
                args.recipe,
                args.keep_ratio,
                quantize=not args.no_quantize,
                samples=args.samples,
            )
        if args.report:
            from omniedge.compress.report import print_report

            print_report(args.out if args.out is not None else Path(args.model))
    elif args.command == "export":
        from omniedge.export.bundle import export_cli

        export_cli(
            args.checkpoint,
            args.out,
            image_size=args.image_size,
            flavour=args.flavour,
            device=args.device,
            fused_qk_norm=None if args.qk_norm is None else args.qk_norm == "fused",
            moe_kernel=args.moe_kernel,
        )
    elif args.command == "build":
        from omniedge.export.trt_build import build_cli

        build_cli(args.bundle)
    elif args.command == "run":
        from omniedge.runtime.cli_run import run_cli

        run_cli(
            args.bundle,
            args.prompt,
            image=args.image,
            audio=args.audio,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            providers=args.providers,
            system=args.system,
        )
    elif args.command == "bench" and args.compare:
        from omniedge.bench.compare import compare

        print(compare(*args.compare), end="")
    elif args.command == "bench":
        from omniedge.bench.harness import bench_cli

        bench_cli(
            args.bundle,
            runs=args.runs,
            new_tokens=args.new_tokens,
            json_path=args.json,
            providers=args.providers,
            contexts=args.contexts,
            baseline=args.baseline,
        )
    elif args.command == "distill":
        from omniedge.distill.cli import distill_cli

        distill_cli(args)
    elif args.command == "eval":
        from omniedge.eval.cli import eval_cli

        if args.model is None and args.compare is None:
            raise OmniedgeError(
                "nothing to evaluate", "pass a checkpoint (or `omni-mini`), or --compare TEACHER STUDENT"
            )
        compare = tuple(args.compare) if args.compare else None
        eval_cli(args.model, args.suite, compare, args.json, args.device, args.limit)
    elif args.command == "info" and args.memory_budget is not None:
        from omniedge.runtime.cli_serve import plan_cli

        plan_cli(
            args.path, args.memory_budget, tuple(args.pin or ("thinker",)), args.max_context, args.providers
        )
    elif args.command == "info":
        from omniedge.info import info_cli

        info_cli(args.path, checksums=not args.no_checksums)
    elif args.command == "serve":
        from omniedge.runtime.cli_serve import serve_cli

        serve_cli(
            args.bundle,
            host=args.host,
            port=args.port,
            memory_budget=args.memory_budget,
            pin=tuple(args.pin or ("thinker",)),
            max_context=args.max_context,
            prefill_chunk=args.prefill_chunk,
            max_queue=args.max_queue,
            max_request_bytes=int(args.max_request_mb * 2**20),
            media_roots=args.media_root,
            providers=args.providers,
            model_name=args.model_name,
            api_key=args.api_key,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] == "help":  # `omniedge` and `omniedge help [COMMAND]`: the help, not an error
        if len(argv) > 1:
            return main([argv[1], "--help"])
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except OmniedgeError as e:
        print(f"omniedge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
