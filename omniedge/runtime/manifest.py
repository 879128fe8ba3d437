"""Read and check a bundle's manifest.json (docs/artifacts.md §2) before any engine is touched.

A bad bundle must fail here, in one sentence that names the file and the fix, not deep inside
onnxruntime. The runtime reads everything it needs from this object and nothing from the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniedge.errors import OmniedgeError
from omniedge.runtime.bundle_files import REEXPORT as _REEXPORT
from omniedge.runtime.bundle_files import check_files, verify

SCHEMA_VERSION = 2  # 2: thinker flavours (ort / portable), rope tables, KV buffer contract
MANIFEST_FILE = "manifest.json"
# Special tokens the runtime needs for each kind of request.
TEXT_TOKENS = ("im_start", "im_end")
IMAGE_TOKENS = ("vision_start", "vision_end", "image_pad")
AUDIO_TOKENS = ("audio_start", "audio_end", "audio_pad")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    onnx: Path | None
    engine: Path | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_bytes: int
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    num_deepstack: int


@dataclass(frozen=True)
class ThinkerGraphSpec:
    """How the thinker graph runs (docs/artifacts.md section 2): `ort` (contrib ops, KV buffer shared by past
    and present, rotary from cos/sin tables) or `portable` (standard ops, KV concatenated per step)."""

    flavour: str
    dtype: str  # activations, KV cache and cos/sin tables
    inv_freq: tuple[float, ...]
    rope_axis: tuple[int, ...]
    rope_scaling: float
    providers: tuple[str, ...]  # execution providers the graph needs (empty: any)
    custom_ops: tuple[str, ...] = ()  # custom-op libraries the graph needs (runtime/custom_ops.py)

    @property
    def input_dtype(self) -> str:
        """The type of the embeddings the graph takes: its own for the ort flavour, float32 for portable."""
        return self.dtype if self.flavour == "ort" else "float32"


FLAVOURS = ("ort", "portable")


@dataclass(frozen=True)
class ImageSpec:
    size: tuple[int, int]  # (height, width) the vision graph was built for
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid_thw: tuple[int, int, int]
    num_tokens: int


@dataclass(frozen=True)
class AudioSpec:
    sampling_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    n_window: int
    n_window_infer: int
    max_seconds: float


@dataclass(frozen=True)
class Manifest:
    root: Path
    raw: dict[str, Any]
    model_name: str
    tokenizer_file: Path
    special_tokens: dict[str, int]
    eos_token_ids: tuple[int, ...]
    text: TextSpec
    embed_file: Path
    embed_dtype: str
    embed_shape: tuple[int, int]
    image: ImageSpec | None
    audio: AudioSpec | None
    position_id_per_seconds: float
    components: dict[str, ComponentSpec]
    thinker: ThinkerGraphSpec

    def token(self, name: str) -> int:
        """Id of a special token by short name, or a clear error if the bundle lacks it."""
        if name not in self.special_tokens:
            raise OmniedgeError(f"bundle {self.root} has no special token {name!r}", _REEXPORT)
        return self.special_tokens[name]


def _bad(root: Path, what: str) -> OmniedgeError:
    return OmniedgeError(f"bundle {root}: {MANIFEST_FILE} {what}", _REEXPORT)


def _get(d: dict[str, Any], key: str, root: Path, where: str, kind: type | tuple[type, ...] = object) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _bad(root, f"has no {where}{key!r}")
    value = d[key]
    if kind is not object and (
        not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind,))
    ):
        raise _bad(root, f"field {where}{key!r} has the wrong type ({type(value).__name__})")
    return value


def bundle_path(root: Path, name: Any, where: str) -> Path:
    """`root / name` for a file the manifest names; refused unless it stays inside the bundle directory."""
    if not isinstance(name, str) or not name:
        raise _bad(root, f"field {where} must be a file name inside the bundle, got {name!r}")
    rel = Path(name)
    inside = not rel.is_absolute() and ".." not in rel.parts
    if inside:
        try:
            inside = (root / rel).resolve().is_relative_to(root)  # a symlink may point out, too
        except (OSError, RuntimeError):
            inside = False
    if not inside:
        raise OmniedgeError(
            f"bundle {root}: {MANIFEST_FILE} field {where} names {name!r}, outside the bundle directory; "
            "refusing to open it",
            "a bundle names only files inside itself: " + _REEXPORT,
        )
    return root / rel


def _int_list(value: Any, root: Path, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise _bad(root, f"field {where} must be a list of integers")
    return [int(x) for x in value]


def _positive_int(d: dict[str, Any], key: str, root: Path, where: str, allow_zero: bool = False) -> int:
    v = _get(d, key, root, where, int)
    if v < 0 or (v == 0 and not allow_zero):
        raise _bad(root, f"field {where}{key!r} must be a positive integer, got {v}")
    return int(v)


def _tensors(items: Any, root: Path, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list):
        raise _bad(root, f"field {where} must be a list of {{name, shape, dtype}}")
    out = []
    for it in items:
        name = _get(it, "name", root, f"{where}[].", str)
        shape = tuple(_get(it, "shape", root, f"{where}[].", list))
        out.append(TensorSpec(name=name, shape=shape, dtype=str(it.get("dtype", "float32"))))
    return tuple(out)


def _component(name: str, c: Any, root: Path) -> ComponentSpec:
    where = f"components.{name}."
    if not isinstance(c, dict):
        raise _bad(root, f"field components.{name} is not an object")
    onnx = c.get("onnx")
    engine = c.get("engine")
    if not onnx and not engine:
        raise _bad(root, f"component {name!r} names neither an onnx nor an engine file")
    sha = c.get("sha256") or {}
    if not isinstance(sha, dict):
        raise _bad(root, f"field {where}sha256 must map file names to hashes")
    for file_name in sha:
        bundle_path(root, file_name, f"{where}sha256")
    return ComponentSpec(
        name=name,
        onnx=bundle_path(root, onnx, where + "onnx") if onnx else None,
        engine=bundle_path(root, engine, where + "engine") if engine else None,
        inputs=_tensors(c.get("inputs", []), root, where + "inputs"),
        outputs=_tensors(c.get("outputs", []), root, where + "outputs"),
        weight_bytes=int(c.get("weight_bytes") or 0),
        sha256={str(k): str(v) for k, v in sha.items()},
    )


def _image(d: dict[str, Any], root: Path) -> ImageSpec:
    w = "preprocess.image."
    size = _get(d, "size", root, w, list)
    grid = _get(d, "grid_thw", root, w, list)
    if len(size) != 2 or len(grid) != 3:
        raise _bad(root, "field preprocess.image.size must be [height, width] and grid_thw [t, h, w]")
    spec = ImageSpec(
        size=(int(size[0]), int(size[1])),
        patch_size=_positive_int(d, "patch_size", root, w),
        temporal_patch_size=_positive_int(d, "temporal_patch_size", root, w),
        merge_size=_positive_int(d, "merge_size", root, w),
        mean=tuple(float(x) for x in _get(d, "mean", root, w, list)),  # type: ignore[arg-type]
        std=tuple(float(x) for x in _get(d, "std", root, w, list)),  # type: ignore[arg-type]
        grid_thw=(int(grid[0]), int(grid[1]), int(grid[2])),
        num_tokens=_positive_int(d, "num_tokens", root, w),
    )
    unit = spec.patch_size * spec.merge_size
    if spec.size[0] % unit or spec.size[1] % unit:
        raise _bad(root, f"image size {spec.size} is not a multiple of patch*merge = {unit}")
    if (spec.size[0] // spec.patch_size, spec.size[1] // spec.patch_size) != spec.grid_thw[1:]:
        raise _bad(root, f"image grid_thw {spec.grid_thw} does not match size {spec.size}")
    t, h, wd = spec.grid_thw
    if t * h * wd // spec.merge_size**2 != spec.num_tokens:
        raise _bad(root, f"image num_tokens {spec.num_tokens} does not match grid_thw {spec.grid_thw}")
    if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
        raise _bad(root, "image mean/std must be 3 numbers each, std > 0")
    return spec


def _audio(d: dict[str, Any], root: Path) -> AudioSpec:
    w = "preprocess.audio."
    max_s = _get(d, "max_seconds", root, w, (int, float))
    if max_s <= 0:
        raise _bad(root, "field preprocess.audio.max_seconds must be > 0")
    return AudioSpec(
        sampling_rate=_positive_int(d, "sampling_rate", root, w),
        n_fft=_positive_int(d, "n_fft", root, w),
        hop_length=_positive_int(d, "hop_length", root, w),
        n_mels=_positive_int(d, "n_mels", root, w),
        n_window=_positive_int(d, "n_window", root, w),
        n_window_infer=_positive_int(d, "n_window_infer", root, w),
        max_seconds=float(max_s),
    )


def _thinker_graph(raw: dict[str, Any], root: Path, text: TextSpec) -> ThinkerGraphSpec:
    g = _get(raw, "thinker_graph", root, "", dict)
    flavour = _get(g, "flavour", root, "thinker_graph.", str)
    if flavour not in FLAVOURS:
        raise _bad(root, f"thinker_graph.flavour is {flavour!r}, not one of {FLAVOURS}")
    dtype = _get(g, "dtype", root, "thinker_graph.", str)
    if dtype not in ("float32", "float16"):
        raise _bad(root, f"thinker_graph.dtype is {dtype!r}, not float32 or float16")
    rope = _get(g, "rope", root, "thinker_graph.", dict)
    inv = tuple(float(x) for x in _get(rope, "inv_freq", root, "thinker_graph.rope.", list))
    axis = tuple(int(x) for x in _get(rope, "axis", root, "thinker_graph.rope.", list))
    if len(inv) != text.head_dim // 2 or len(axis) != len(inv) or any(a not in (0, 1, 2) for a in axis):
        raise _bad(root, f"thinker_graph.rope has {len(inv)} frequencies for head_dim {text.head_dim}")
    return ThinkerGraphSpec(
        flavour=flavour,
        dtype=dtype,
        inv_freq=inv,
        rope_axis=axis,
        rope_scaling=float(rope.get("scaling", 1.0)),
        providers=tuple(str(p) for p in g.get("providers", [])),
        custom_ops=tuple(str(p) for p in g.get("custom_ops", [])),
    )


def _read_json(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise OmniedgeError(
            f"bundle not found: {root}",
            "pass a directory written by `omniedge export`, or omit it for the default",
        )
    if not root.is_dir():
        raise OmniedgeError(
            f"{root} is a file, not a bundle directory", "pass the directory holding manifest.json"
        )
    f = root / MANIFEST_FILE
    if not f.is_file():
        hint = " (it looks like a checkpoint: export it first)" if (root / "config.json").is_file() else ""
        raise OmniedgeError(f"{root} is not an engine bundle: it has no {MANIFEST_FILE}{hint}", _REEXPORT)
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmniedgeError(f"{f} is not valid JSON ({e})", _REEXPORT) from e
    if not isinstance(raw, dict):
        raise _bad(root, "is not a JSON object")
    return raw


def _check_schema(raw: dict[str, Any], root: Path) -> None:
    version = raw.get("schema_version")
    if version is None:
        raise _bad(root, "has no schema_version: it was not written by omniedge export")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise OmniedgeError(
            f"bundle {root} has manifest schema_version {version!r}; this omniedge reads {SCHEMA_VERSION}",
            "upgrade omniedge on this device" if newer else _REEXPORT,
        )


def load_manifest(bundle_dir: str | Path, verify_checksums: bool = False) -> Manifest:
    """Parse and validate a bundle's manifest; check that every file it names is there (and its hash)."""
    root = Path(bundle_dir).expanduser().resolve()
    raw = _read_json(root)
    _check_schema(raw, root)
    try:
        m = _parse(raw, root)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # a field of the wrong shape
        raise _bad(root, f"has a field of the wrong type or shape ({type(e).__name__}: {e})") from e
    check_files(m)
    if verify_checksums:
        verify(m)
    return m


def _parse(raw: dict[str, Any], root: Path) -> Manifest:
    special_raw = _get(raw, "special_tokens", root, "", dict)
    special = dict(
        zip(special_raw, _int_list(list(special_raw.values()), root, "special_tokens"), strict=True)
    )
    for name in TEXT_TOKENS:
        if name not in special:
            raise _bad(root, f"special_tokens lacks {name!r}")
    eos = _int_list(_get(raw, "eos_token_ids", root, "", list), root, "eos_token_ids")
    if not eos:
        raise _bad(root, "eos_token_ids is empty: generation could never stop")
    t = _get(raw, "text", root, "", dict)
    text = TextSpec(
        hidden_size=_positive_int(t, "hidden_size", root, "text."),
        num_layers=_positive_int(t, "num_layers", root, "text."),
        num_kv_heads=_positive_int(t, "num_kv_heads", root, "text."),
        head_dim=_positive_int(t, "head_dim", root, "text."),
        vocab_size=_positive_int(t, "vocab_size", root, "text."),
        max_position_embeddings=_positive_int(t, "max_position_embeddings", root, "text."),
        num_deepstack=_positive_int(t, "num_deepstack", root, "text.", allow_zero=True),
    )
    emb = _get(raw, "embed_tokens", root, "", dict)
    emb_shape = tuple(_int_list(_get(emb, "shape", root, "embed_tokens.", list), root, "embed_tokens.shape"))
    if len(emb_shape) != 2 or emb_shape[1] != text.hidden_size:
        raise _bad(root, f"embed_tokens.shape {list(emb_shape)} is not [vocab, {text.hidden_size}]")

    pre = _get(raw, "preprocess", root, "", dict)
    comps_raw = _get(raw, "components", root, "", dict)
    components = {k: _component(k, v, root) for k, v in comps_raw.items() if v}
    if "thinker" not in components:
        raise _bad(root, "has no thinker component")
    image = _image(pre["image"], root) if pre.get("image") and "vision" in components else None
    audio = _audio(pre["audio"], root) if pre.get("audio") and "audio" in components else None
    for needed, spec in ((IMAGE_TOKENS, image), (AUDIO_TOKENS, audio)):
        for name in needed if spec is not None else ():
            if name not in special:
                raise _bad(root, f"special_tokens lacks {name!r}")

    m = Manifest(
        root=root,
        raw=raw,
        model_name=str((raw.get("model") or {}).get("name", "unknown")),
        tokenizer_file=bundle_path(root, _get(raw, "tokenizer", root, "", str), "tokenizer"),
        special_tokens=special,
        eos_token_ids=tuple(int(x) for x in eos),
        text=text,
        embed_file=bundle_path(root, _get(emb, "file", root, "embed_tokens.", str), "embed_tokens.file"),
        embed_dtype=str(emb.get("dtype", "float32")),
        embed_shape=(emb_shape[0], emb_shape[1]),
        image=image,
        audio=audio,
        position_id_per_seconds=float(pre.get("position_id_per_seconds", 13)),
        components=components,
        thinker=_thinker_graph(raw, root, text),
    )
    return m
