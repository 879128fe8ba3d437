"""The thinker's rotary embedding as the runtime needs it, read off transformers' own module.

Qwen3-Omni's M-RoPE gives every frequency j of a head one of three position axes (time, height, width:
interleaved sections, `mrope_section`). Rather than restating that rule, the exporter asks transformers'
rotary module: one probe per axis shows which frequencies follow it. The manifest stores the inverse
frequencies, that axis map and the scaling; the runtime's `rope_rows` (runtime/mrope.py) turns positions
into the cos/sin rows the graph takes. Text and audio tokens have equal positions on all axes, so decode
needs only the plain table of one position per row.
"""

from __future__ import annotations

from typing import Any

from omniedge.errors import OmniedgeError


def _rotary_class() -> Any:
    import transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe as m

    for name in dir(m):
        if name.endswith("TextRotaryEmbedding") and "Thinker" in name:
            return getattr(m, name)
    raise OmniedgeError(
        "this transformers has no Qwen3-Omni thinker rotary embedding", "use transformers 5.17-5.24"
    )


def rope_spec(text_config: Any) -> dict[str, Any]:
    """{"inv_freq": [...], "axis": [...], "scaling": s}: cos row of a token = cos(pos[axis[j]] * inv_freq[j]) * s."""
    import torch

    rotary = _rotary_class()(text_config).eval()
    half = int(rotary.inv_freq.shape[0])
    x = torch.zeros(1, 1, 1, dtype=torch.float32)
    axis = [-1] * half
    with torch.no_grad():
        for a in range(3):
            pos = torch.zeros(3, 1, 1, dtype=torch.long)
            pos[a] = 1
            _, sin = rotary(x, pos)
            moved = sin[0, 0, :half].abs() > 0
            for j in range(half):
                if bool(moved[j]):
                    axis[j] = a
        _, sin_all = rotary(x, torch.ones(3, 1, 1, dtype=torch.long))
    if -1 in axis:
        raise OmniedgeError("could not read the rotary axis of every frequency", "report this as a bug")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    inv = [float(v) for v in rotary.inv_freq.float()]
    # the probe must reproduce transformers: sin(1 * inv_freq) * scaling on every frequency
    want = torch.sin(torch.tensor(inv)) * scaling
    if not torch.allclose(sin_all[0, 0, :half].float(), want, atol=1e-6):
        raise OmniedgeError(
            "transformers' rotary embedding is not of the form the runtime computes", "report this"
        )
    return {"inv_freq": inv, "axis": axis, "scaling": scaling}
