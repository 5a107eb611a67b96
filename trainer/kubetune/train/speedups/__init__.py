"""Optional per-step speed-ups; each leaves the results as they were (its test says how close) and saves time.

- fast_dropout: CPU dropout masks from 16-bit draws, four per random word (MiniLM LoRA: 1.09-1.14x per step).
- fused_gelu: GPT-2's spelled-out tanh GELU as torch's one-kernel GELU (4-layer GPT-2: 1.08-1.14x per step).
- segment_attention: packed rows attend per example on CPU, not through a row-wide mask (1.37-1.41x at 512-1024).
- target_logits: a causal LM's output layer runs only where a target is (GPT-2's 50k vocabulary: 1.8x per step).
- gloo_overlap: FSDP on one host's CPU processes gathers by all-reduce and prefetches (FSDP/DDP speed 0.62 -> 0.74).
"""
