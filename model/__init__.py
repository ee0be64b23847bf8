"""The neural parts of rectrain, free of I/O: encoder, pooling, prompts, loss, cross-rank gather."""
