"""Model FLOPs, device peaks and MFU: what `th.py bench` and every run's metrics report.

FLOPs of a training step (forward + backward = 3x forward, matmuls only, a multiply-add counts 2), as nanoGPT and
the PaLM paper count them; each formula is a method of its model's config (GPTConfig.flops_per_token,
TransformerConfig.flops), computed from the shape alone (a ZeRO-3 rank's partitioned params need no counting):

    GPT, per token:  6 N + 12 L H Q T       N = parameters without the position embeddings (the token embedding
                                            stays: it is also the output layer; padded (vocab_multiple), with its
                                            pad rows, which the output matmul computes: 50257 tokens in 50304
                                            rows count as nanoGPT's 50304), L layers, H heads of width Q,
                                            T the sequence length (attention scores and their use; the causal
                                            mask's skipped half is counted, as everyone does).
    Transformer:     encoder tokens  6 N_enc + 12 L_enc D S
                     decoder tokens  6 (N_dec + N_out) + 12 L_dec D (T + S)    (self- and cross-attention)
                     with cross-attention's key/value projections counted per *source* token, and the embedding
                     tables left out (lookups, not matmuls); padding counts (the hardware computes it).

MFU = model FLOPs per second / the device's peak: H100 SXM 989 TFLOP/s (bf16/fp16, dense), A100 312; fp32 uses
the TF32 peak when TF32 matmuls are allowed. Any other device (every CPU) gets a measured matmul rate in the
run's dtype instead of a datasheet figure, so on CPU "MFU" reads "fraction of what this machine's matmul does now".
"""
import functools
import statistics
import time

import torch

# (bf16/fp16, tf32, fp32) dense TFLOP/s from the vendors' datasheets
# (first match wins: the PCIe and NVL H100s are slower parts than the SXM one the bare name means)
_PEAKS = {"H100 PCIe": (756.0, 378.0, 51.2), "H100 NVL": (835.0, 417.5, 60.0), "H100": (989.0, 494.5, 66.9),
          "H200": (989.0, 494.5, 66.9), "A100": (312.0, 156.0, 19.5)}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpt_flops_per_token(model, seq_len: int) -> float:
    """6N + 12·L·H·Q·T for a thcore GPT: its config's formula (models/gpt.py:GPTConfig.flops_per_token)."""
    return model.config.flops_per_token(seq_len)


def step_flops(model, batches) -> float | None:
    """Model FLOPs of a training step over `batches` (one batch dict or a list of micro-batches), from the
    batch shapes alone (no device access, no sync): the model config's formula (`config.step_flops`); None for
    a model without one."""
    formula = getattr(getattr(model, "config", None), "step_flops", None)
    if formula is None:
        return None
    return sum(formula(b) for b in (batches if isinstance(batches, (list, tuple)) else [batches]))


def measured_matmul_flops(device, dtype=torch.float32, n: int = 1024, reps: int = 8, clock=time.perf_counter) -> float:
    """FLOP/s of an n x n matmul on `device` now: the median of `reps` timings after a warm-up (`clock`:
    time.process_time measures CPU time, what a shared CPU machine gives reproducibly)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        if i >= 2:
            times.append(clock() - t0)
    return 2.0 * n ** 3 / statistics.median(times)


@functools.lru_cache(maxsize=None)
def peak_flops(device: str, precision: str = "fp32", clock=time.perf_counter) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for `device` ("cpu", "cuda", "cuda:1") at `precision`."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32, fp32) in _PEAKS.items():
            if key in name:
                if precision in ("bf16", "fp16"):
                    return half * 1e12, f"{key} datasheet"
                tf = torch.backends.cuda.matmul.fp32_precision == "tf32"   # engines turn it on (use_tf32)
                return (tf32 if tf else fp32) * 1e12, f"{key} datasheet ({'tf32' if tf else 'fp32'})"
    dtype = _DTYPES[precision]
    # an unknown GPU: a matmul large enough that launch latency does not count (1024^3 is mostly latency there)
    n = 8192 if device.type == "cuda" else 1024
    return measured_matmul_flops(device, dtype, n=n, clock=clock), f"measured {dtype} matmul on {device.type}"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def mfu_fields(flops: float, seconds: float, device, precision: str) -> dict:
    """{"mfu": ...} for a metrics line: `flops` model FLOPs done on this device in `seconds`; {} without a count."""
    if not flops or seconds <= 0:
        return {}
    return {"mfu": flops / seconds / peak_flops(str(device), precision)[0]}
