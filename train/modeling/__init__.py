"""Building the model: backbone + LoRA + heads, the objective, the tokenizer, checkpoints."""
