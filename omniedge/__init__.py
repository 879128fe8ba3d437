"""omniedge: Qwen3-Omni on a Jetson AGX Orin: compress, export, build, serve, bench."""

__version__ = "0.1.0"
