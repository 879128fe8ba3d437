"""Knowledge distillation: the original model (teacher) guides a smaller Qwen3-Omni student.

The student is usually the pruned model from `omniedge compress` (Minitron's prune-then-distil), later
quantized; any student of the Qwen3-Omni architecture with the teacher's vocabulary and input contract
works. One module per job:

- `loss`: cross-entropy on the labels + T^2 x KL(teacher || student) at temperature T (dense or top-k).
- `data`: a training pack or dataset directory -> a fixed list of examples, its fingerprint, the batch plan.
- `pair`: loading teacher and student, and the checks that they can be distilled (vocabulary, inputs).
- `teacher_cache`: teacher logits precomputed once as top-k in sharded safetensors with a manifest.
- `trainable`: what to train (all, experts + routers, LoRA) and INT4 fake quantization (straight-through).
- `loop`: the accelerate training loop (gradient accumulation, checkpoints, resume, progress, eval).
- `finish`: the student written back as a checkpoint, INT4 by the compress stage's own quantizer.
- `cli`: `omniedge distill TEACHER STUDENT -o OUT ...` (docs/distill.md).
"""
