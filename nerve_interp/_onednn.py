"""float32 products ``a bᵀ`` on the CPU through oneDNN, where this torch has it.

On a CPU, ``torch.mm`` of float32 tensors calls MKL's ``sgemm``, and MKL runs its AVX2
kernels on AMD processors. oneDNN, which torch also ships, picks its kernels from the
instruction set alone. On an AMD EPYC (Zen 5, AVX-512) the upper-triangle Gram of 820 rows at
D = 1536 (:func:`nerve_interp.covariance.add_upper_gram`) took 5.6 ms through oneDNN against
10.8 ms through MKL at 2 threads (9.8 against 19.0 ms at 1 thread). With oneDNN held to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``) the two took the same time (10.4 against 10.6 ms), so oneDNN is
not slower where it has no AVX-512 to gain from.

Both are IEEE float32 products (fused multiply-adds with a float32 accumulator); they differ
in the order of the sums, so at round-off. TF32 and bf16-decomposed float32 products
(``torch.backends.mkldnn.matmul.fp32_precision``) are forbidden around every call by
:func:`nerve_interp.covariance.full_precision_matmul`, and :func:`available` checks the
product against float64 once per process before it is used.

The entry point is ``torch.ops.mkldnn._linear_pointwise`` (what torch's own compiler emits
for a linear layer on the CPU), a private operator: when a torch lacks it, or it fails the
check, every product falls back to ``torch.mm``. ``NERVE_INTERP_ONEDNN=0`` in the
environment turns it off.
"""

from __future__ import annotations

import os

import torch

_PROBE: dict[str, bool] = {}
ENV = "NERVE_INTERP_ONEDNN"
"""Set to ``0`` to multiply with ``torch.mm`` (MKL) instead."""


def _linear() -> object | None:
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _probe() -> bool:
    """True when oneDNN's product of two small random float32 matrices is a float32 dense
    tensor within float32 round-off of the float64 product (so neither a TF32 nor a bf16
    product: those are off by ~1e-4 and ~1e-3)."""
    op = _linear()
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 72, generator=g), torch.randn(56, 72, generator=g)
    try:
        out = op(a, b, None, "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    if out.dtype != torch.float32 or out.layout != torch.strided or out.shape != (40, 56):
        return False
    ref = a.double() @ b.double().T
    return bool((out.double() - ref).abs().max() <= 1e-5 * ref.abs().max())


def available() -> bool:
    """Whether :func:`rows_times_rows` multiplies through oneDNN in this process (checked
    once; ``NERVE_INTERP_ONEDNN=0`` says no). Call it where TF32 and bf16 products are
    forbidden (:func:`nerve_interp.covariance.full_precision_matmul`)."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    if "ok" not in _PROBE:
        _PROBE["ok"] = _probe()
    return _PROBE["ok"]


def rows_times_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a bᵀ`` in float32 through oneDNN.

    Parameters
    ----------
    a : torch.Tensor of shape (M, K), float32, contiguous, on the CPU
    b : torch.Tensor of shape (P, K), float32, contiguous, on the CPU
        Both must be row-major: a transposed view costs oneDNN a reorder per call (seconds
        instead of milliseconds at K = 820, D = 1536).

    Returns
    -------
    torch.Tensor of shape (M, P), float32
    """
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("rows_times_rows needs contiguous (row-major) a and b; pass "
                         "x.contiguous() (a transposed view is reordered on every call).")
    return _linear()(a, b, None, "none", [], "")


__all__ = ["ENV", "available", "rows_times_rows"]
