"""Robot-side client: ask the local omniedge server about a camera frame and a microphone clip.

Runs anywhere the `openai` package is installed (`pip install openai`), against `omniedge serve` on the
Jetson (the systemd unit in this folder starts it at boot on 127.0.0.1:8000):

    python3 robot_client.py --image cam.jpg --audio question.wav "What do you see and hear?"
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

from openai import OpenAI


def _image_part(path: Path) -> dict:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _audio_part(path: Path) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": path.suffix.lstrip(".").lower()}}


def ask(
    base_url: str, prompt: str, image: Path | None = None, audio: Path | None = None, max_tokens: int = 64
) -> str:
    """Stream the answer to stdout as it comes; return it whole."""
    client = OpenAI(base_url=base_url, api_key="local", max_retries=1)
    content: list[dict] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append(_image_part(Path(image)))
    if audio is not None:
        content.append(_audio_part(Path(audio)))
    model = client.models.list().data[0].id  # the one model the server serves
    pieces = []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(pieces[-1], end="", flush=True)
    print()
    return "".join(pieces)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--image", type=Path)
    p.add_argument("--audio", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    ask(args.url, args.prompt, args.image, args.audio, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
