"""Weights: where every parameter's values come from and go to.

Owns: meta-device models and their materialisation, sharding-independent random init,
per-rank sliced safetensors loading and the rank-0 broadcast path, gathering full state
dicts and Hugging Face export (`loading`), and atomic DCP checkpoints (`checkpoint`).

May import: torch, safetensors, `meshplan.planner`, `runtime.parallel` (the Applied
model, fused-row orders). Never `train` or `explain`.
"""
