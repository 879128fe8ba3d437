"""Is a WAV file shorter than its header says? (A copy cut short, a recorder that died mid-file.)

Decoders read what is there and say nothing; the runtime uses those samples but says so, in the
result's warnings and on the command line, so a cut-off question is never answered silently.
"""

from __future__ import annotations

import struct
from pathlib import Path

_UNKNOWN_LENGTH = (0, 0xFFFFFFFF)  # streaming writers leave the data size open


def truncation_note(path: str | Path) -> str | None:
    """A one-line warning when `path` is a RIFF/WAVE file whose data chunk is shorter than declared."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            byte_rate = 0
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(min(length, 16))
                    if len(fmt) >= 12:
                        byte_rate = struct.unpack("<I", fmt[8:12])[0]
                    f.seek(length - len(fmt) + (length & 1), 1)
                    continue
                if cid != b"data":
                    f.seek(length + (length & 1), 1)
                    continue
                if length in _UNKNOWN_LENGTH:
                    return None
                present = size - f.tell()
                if present >= length:
                    return None
                if byte_rate:
                    return (
                        f"audio file {p} is truncated: its header promises {length / byte_rate:.2f} s, "
                        f"the file holds {max(present, 0) / byte_rate:.2f} s; using what is there"
                    )
                return (
                    f"audio file {p} is truncated: its header promises {length} bytes of samples, "
                    f"the file holds {max(present, 0)}; using what is there"
                )
    except OSError:
        return None
