"""Model-FLOP utilisation: the backbone's useful work per second against the device's peak.

Useful work is counted on real tokens only (padding is waste, not work), for the backbone's
matrix products and attention:
- forward: 2 FLOPs per weight per token, and 2 * d per query-key pair per layer (scores and
  the weighted sum, causal: a sequence of T tokens has T(T+1)/2 pairs);
- backward: the activations' gradients cost a forward again; weight gradients are counted for
  trained weights only (LoRA's, a negligible share), so a LoRA step is about 2x its forward,
  not the 3x of full fine-tuning. Attention's backward is counted as twice its forward.
Layers a step does not run (the frozen lower layers of model.trained_layers, whose states are
cached) are not counted. The peak: a table of datasheet dense peaks for GPUs; on a CPU, the
matrix-multiply rate measured at start-up (the same threads, the same dtype).
"""

from __future__ import annotations

import time
from typing import Any

import torch

# Dense (no sparsity) peaks in TFLOP/s, from the vendors' datasheets: (bf16/fp16, tf32). fp32 runs
# are measured against the TF32 peak, which torch reaches only with TF32 matmuls allowed.
GPU_PEAKS = {"H200": (989.0, 494.0), "H100 SXM": (989.0, 494.0), "H100 NVL": (835.0, 418.0),
             "H100 PCIe": (756.0, 378.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
             "L4": (121.0, 60.0), "A10G": (70.0, 35.0), "A10": (125.0, 62.5), "V100": (125.0, 15.7),
             "RTX 4090": (165.0, 82.6), "RTX 3090": (71.0, 35.6), "T4": (65.0, 8.1)}


def measured_cpu_peak(dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a 1024-square matrix multiply on this process's threads, the best of a few."""
    # Its own generator: drawing from the global one would change the run's dropout masks.
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1024, 1024, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm-up: first-call allocation and kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - start))
    return best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device for train.precision, where the figure comes from); 0 when unknown."""
    half = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (peak16, peak32) in GPU_PEAKS.items():  # the most specific names come first
            if key in name:
                return (peak16 if half else peak32) * 1e12, f"{name} datasheet"
        return 0.0, f"{name}: not in rectrain's table of peaks"
    if device.type == "cpu":
        dtype = torch.bfloat16 if half else torch.float32
        return measured_cpu_peak(dtype), f"CPU matmul measured at start-up ({torch.get_num_threads()} threads)"
    return 0.0, f"{device.type}: no known peak"


class StepFlops:
    """Useful FLOPs of a step from the tokens it fed the backbone (`tokens`, and the sum of
    each sequence's squared length, `token_squares`, for attention)."""

    def __init__(self, backbone_config: Any, layers_run: int, trained_params: int) -> None:
        hidden = int(backbone_config.hidden_size)
        heads = int(backbone_config.num_attention_heads)
        kv_heads = int(getattr(backbone_config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(backbone_config, "head_dim", None) or hidden // heads)
        ffn = int(getattr(backbone_config, "intermediate_size", 4 * hidden))
        # q and o: hidden x heads*head_dim; k and v: hidden x kv_heads*head_dim; gated MLP: 3 matrices.
        per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn
        self.weights = per_layer * layers_run
        self.attention_width = layers_run * heads * head_dim
        self.trained = trained_params if layers_run else 0

    def __call__(self, tokens: int, token_squares: int) -> float:
        linear = 2 * self.weights * tokens
        attention = 2 * self.attention_width * (token_squares + tokens)  # T(T+1)/2 pairs, 4 FLOPs each
        return 2 * linear + 2 * self.trained * tokens + 3 * attention
