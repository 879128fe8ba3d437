"""The offline compression stage: calibration, expert pruning, distillation, INT4 quantization, recipes."""
