"""Training omni-mini: dataset records -> chat-format batches -> a compact pack -> the training loop."""
