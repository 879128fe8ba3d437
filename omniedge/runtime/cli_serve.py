"""`omniedge serve` and `omniedge info BUNDLE --memory-budget`: thin shells over server.py and scheduler.py."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path

from omniedge.errors import OmniedgeError
from omniedge.runtime.memory import mib


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_cli(
    bundle: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    memory_budget: str | None = None,
    pin: Sequence[str] = ("thinker",),
    max_context: int | None = None,
    max_queue: int = 16,
    max_request_bytes: int | None = None,
    prefill_chunk: int | None = None,
    media_roots: Sequence[Path] = (),
    providers: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
) -> None:
    """Load the bundle (under the budget), print the plan, and serve until interrupted."""
    try:
        import uvicorn  # noqa: F401

        from omniedge.runtime.server import (
            DEFAULT_MAX_REQUEST_BYTES,
            ServerLimits,
            create_app,
            uvicorn_server,
        )
    except ImportError as e:
        raise OmniedgeError(
            f"`omniedge serve` needs the server extra ({e.name} is missing)", 'pip install "omniedge[serve]"'
        ) from e
    from omniedge.runtime.app import Omni
    from omniedge.runtime.cli_run import _default_bundle
    from omniedge.runtime.memory import tune_malloc_for_serving

    tune_malloc_for_serving()  # before any engine loads or request thread starts

    bundle_dir = _default_bundle() if bundle is None else Path(bundle)
    for root in media_roots:
        if not Path(root).is_dir():
            raise OmniedgeError(f"--media-root {root} is not a directory", "pass a directory that exists")
    omni = Omni.load(
        bundle_dir,
        providers=providers,
        max_context=max_context,
        memory_budget=memory_budget,
        pin=tuple(pin),
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
    )
    name = model_name or omni.manifest.model_name
    if omni.scheduler is not None:
        print("\n".join(omni.scheduler.plan.describe()), file=sys.stderr)
    if not _is_loopback(host):
        print(
            f"warning: listening on {host}: anyone who can reach this machine can use the model"
            + ("" if api_key else " (no --api-key)"),
            file=sys.stderr,
        )
    limits = ServerLimits(
        max_request_bytes=max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
        media_roots=tuple(Path(r) for r in media_roots),
        api_key=api_key,
    )
    print(f"serving {name} on http://{host}:{port}/v1 (context {omni.max_context} tokens)", file=sys.stderr)
    server = uvicorn_server(create_app(omni, name, limits), host, port, log_level="warning")
    try:
        server.run()
    finally:
        omni.close()


def plan_cli(
    bundle: Path,
    memory_budget: str,
    pin: Sequence[str] = ("thinker",),
    max_context: int | None = None,
    providers: str | None = None,
) -> None:
    """Print the memory plan for a bundle from its recorded footprints (weight files where none is recorded)."""
    from omniedge.runtime.backends import resolve_providers
    from omniedge.runtime.budget import plan_for
    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.memory import default_meter
    from omniedge.runtime.plan import ENGINES

    m = load_manifest(bundle)
    chosen = resolve_providers(providers)
    meter = default_meter(chosen)
    names = [n for n in ENGINES if n in m.components]
    # The base is this process now (the CLI, numpy, the manifest) plus the embedding table; a server adds
    # its own libraries, so it measures its base again at start.
    base = meter.current() + (m.embed_file.stat().st_size if m.embed_file.is_file() else 0)
    plan, store = plan_for(m, memory_budget, names, chosen, meter, base, tuple(pin), max_context)
    print("\n".join(plan.describe()))
    recorded = store.path if store.path.is_file() else "none yet"
    print(f"  recorded   {recorded}; smallest workable budget {mib(plan.as_dict()['min_budget_bytes'])}")
