r"""Streaming, mergeable covariance of activations: count, mean, centred second moment.

The state of a :class:`CovarianceAccumulator` is ``(n, μ, M2)`` in **float64**, with
``M2 = Σ_n (x_n − μ)(x_n − μ)ᵀ``, so that ``Σ = M2 / (n − 1)`` (centred, unbiased, as
[NerVE] Eq. 1). Each batch is first centred on a per-batch shift, its scatter matrix is
formed in the accumulator's ``precision`` (below), and it is folded into the state with the
exact parallel update of Chan, Golub & LeVeque (1979):

    n   = n_a + n_b
    δ   = μ_b − μ_a
    μ   = μ_a + δ · n_b / n
    M2  = M2_a + M2_b + δ δᵀ · n_a n_b / n

The same update merges two accumulators (other processes, other data shards), so results do
not depend on how the data were split or in which order they were merged (up to float64
round-off).

Precision of the per-batch scatter (``precision=``)
---------------------------------------------------
- ``"fp64"``: centre on the exact batch mean, Gram product in float64. Exact to float64
  round-off; the CPU default until fp32's accuracy was measured (below).
- ``"fp32"``: centre on the batch mean rounded to float32, Gram product in float32 (TF32
  forbidden while it runs). The per-batch product runs at twice fp64's rate on a CPU (the
  capture of SmolLM2-135M's 60 points streams at 1.30× a plain forward against fp64's 1.55×,
  1 thread), much faster on GPUs; every metric of that capture moved by at most 5.4e-6
  relative (docs/howto.md, "Precision on a CPU").
- ``"bf16-split"``: centre on the batch mean rounded to **bfloat16** (so the shift ``s`` is
  itself a bf16 number), form ``d = x − s`` in float32 and split it as ``d = hi + lo`` with
  ``hi = bf16(d)`` and ``lo = bf16(d − hi)``. For bf16 activations ``d`` is exact and so is
  the split whenever ``d`` needs at most 16 significant bits; otherwise ``hi + lo`` keeps 16
  of them (relative error ≤ 2⁻¹⁷ per value). The scatter is then
  ``dᵀd = hiᵀhi + (hiᵀlo + (hiᵀlo)ᵀ) + loᵀlo``: three bf16 matrix products with float32
  accumulation (bf16 tensor cores on a GPU; on a CPU the same products are computed from the
  exactly-widened float32 values). The exact residual ``Σ(hi + lo)`` corrects for the shift
  in float64, and the diagonal is summed in float64 (below). Opt-in, *not* yet the CUDA
  default: on CPU emulation it is at least as accurate as ``"fp32"`` (heavy-tailed bf16
  data, dense covariance over 5 decades, D=256, 2048 rows per update: worst tail-decile
  relative eigenvalue error 3.2e-5–5.3e-5 against fp32's 1.3e-4–1.4e-4), but tensor cores
  may round their internal sums differently from IEEE float32 (Fasi et al. 2021 found
  truncation on V100/T4/A100), and that has not been measured on a GPU yet: ``pytest -m
  gpu`` and ``make bench`` do. Dropping ``loᵀlo`` is *not* an option: it costs 10–30× in
  tail accuracy.
- ``"auto"`` (default): ``"fp32"`` on every device (:func:`default_precision` says why).

**The float64 diagonal** (every mode below fp64). A float32 product rounds every partial sum
of ``Σ d_i²``. When the ``d`` have short significands (bf16 values, the ``hi`` of a split)
their squares share their low bits, so the rounding errors do not cancel but bias every
diagonal entry low: on the data above, −1.3e-4 per entry, about 3e-3 of the smallest
eigenvalues, which was the whole excess error of the split over fp32 (3.0e-3 before, 3.2e-5
after). The diagonal is therefore summed in float64 (:func:`exact_diagonal`, O(N·D) against
the product's O(N·D²)).

**Half the products on the CPU.** The scatter is symmetric, so on the CPU (``"fp64"`` and
``"fp32"``) each update forms only its upper block triangle, one GEMM per panel of 192
columns (:func:`add_upper_gram`: 56% of the multiply-adds at D = 1536), and the rank-one
corrections touch the same half. The float32 panels go through oneDNN where torch has it
(:mod:`nerve_interp._onednn`; MKL's ``sgemm`` runs AVX2 kernels on AMD CPUs, oneDNN their
AVX-512 ones: 1.9x faster on a Zen 5 EPYC), in products of at most 256 rows
(:data:`ONEDNN_ROWS`), so their round-off matches MKL's. The lower half is copied from the
upper one when the scatter is read (``scatter_``, ``covariance_``, ``state_dict``,
``merge``); the streamed fourth moment reads ``M2 δ`` from the upper half
(:meth:`CovarianceAccumulator.scatter_matvec`).

**Massive activations in float64** (every mode below fp64). A row with more than 64× the
median ``‖x − s‖²`` of its batch (an attention-sink token: 500× the median norm at
SmolLM2-135M's layer 11 ``post``) would set the float32 round-off of every entry and, through
the batch mean, offset every other row. Such rows are zeroed in the float32 product, the
others are centred on their own mean, and the few massive rows are multiplied in float64
(:func:`massive_rows`). Without it, the spectrum *without* those tokens
(``SpectraResult.without_outliers``) lost its tail: its smallest eigenvalue came out 83% low.

A 16-bit Gram matrix (``"bf16"``, ``"fp16"``) and TF32 (``"tf32"``) are refused: with a mean
offset the cancellation in ``E[xxᵀ] − μμᵀ`` destroys the tail of the spectrum (DESIGN.md:
on an H100, 1271 of 3072 eigenvalues came out negative with bf16; TF32's tail error was
~6000× fp32's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _onednn
from ._scratch import scratch
from .errors import CaptureError, NotFittedError, ResultsFileError
from .moments import BatchMoments, MomentSums, NormMoments

LowRank = tuple[torch.Tensor, torch.Tensor]
"""``(u, v)`` of shape (D, k) each: the low-rank term ``u vᵀ``."""

PRECISIONS = ("fp64", "fp32", "bf16-split")
"""Accumulation modes of :class:`CovarianceAccumulator` (plus ``"auto"``)."""

_REFUSED = {
    "bf16": "a bfloat16 Gram matrix keeps 8 significant bits",
    "bfloat16": "a bfloat16 Gram matrix keeps 8 significant bits",
    "fp16": "a float16 Gram matrix keeps 11 significant bits and overflows at 65504",
    "float16": "a float16 Gram matrix keeps 11 significant bits and overflows at 65504",
    "half": "a float16 Gram matrix keeps 11 significant bits and overflows at 65504",
    "tf32": "TF32 matmuls round their inputs to 11 significant bits (tail eigenvalue error "
            "~6000x fp32's on an H100)",
}
_GRAM_DTYPE_PRECISION = {torch.float64: "fp64", torch.float32: "fp32"}
_PRECISION_GRAM_DTYPE = {"fp64": torch.float64, "fp32": torch.float32,
                         "bf16-split": torch.float32}
_BF16 = torch.bfloat16


def default_precision(device: torch.device | str) -> str:
    """The accumulation mode ``"auto"`` picks on ``device``: ``"fp32"`` everywhere.

    A float32 per-batch Gram of *centred* rows, folded into float64 state: on a CPU it runs
    at twice fp64's rate (the streaming part of a SmolLM2-135M capture, 60 points, fell
    from 1.55x to 1.30x a plain forward) and moved every metric of that capture by at most
    5.4e-6 relative, far below the jackknife interval of any metric (docs/howto.md,
    "Precision on a CPU"). TF32 is forbidden while the product runs on CUDA.
    ``precision="fp64"`` is exact to float64 round-off and one keyword away.
    ``"bf16-split"`` is faster on tensor cores and as accurate on CPU emulation, but not
    the default until its accuracy is measured on tensor cores (see the module docstring).

    ``device`` is kept so that the choice can differ by device again.

    Examples
    --------
    >>> default_precision("cpu"), default_precision("cuda:0")
    ('fp32', 'fp32')
    """
    torch.device(device)  # validates the device string
    return "fp32"


def check_precision(precision: str = "auto", gram_dtype: torch.dtype | None = None,
                    *, name: str = "activations") -> str:
    """Validate an accumulation mode (``gram_dtype`` is its older synonym).

    Parameters
    ----------
    precision : {"auto", "fp64", "fp32", "bf16-split"}
        See the module docstring.
    gram_dtype : torch.float64 or torch.float32, optional
        Older spelling: ``torch.float64`` means ``"fp64"``, ``torch.float32`` ``"fp32"``.
    name : str
        Used in error messages.

    Returns
    -------
    str
        One of ``"auto"``, ``"fp64"``, ``"fp32"``, ``"bf16-split"``.

    Raises
    ------
    ValueError
        An unknown mode, a refused 16-bit / TF32 mode, or ``precision`` and ``gram_dtype``
        that disagree.
    """
    if gram_dtype is not None:
        if gram_dtype not in _GRAM_DTYPE_PRECISION:
            raise ValueError(
                f"gram_dtype={gram_dtype} for {name}: use torch.float64 (exact) or torch.float32 "
                "(faster, still centred), or precision='bf16-split' for bf16 tensor cores. "
                "16-bit Gram matrices lose the spectrum's tail."
            )
        from_dtype = _GRAM_DTYPE_PRECISION[gram_dtype]
        if precision not in ("auto", from_dtype):
            raise ValueError(
                f"precision={precision!r} and gram_dtype={gram_dtype} for {name} disagree; "
                "pass only precision= (gram_dtype is its older synonym)."
            )
        return from_dtype
    if not isinstance(precision, str):
        raise TypeError(f"precision for {name} must be a str; got {type(precision).__name__} "
                        f"{precision!r}. Choose one of {('auto', *PRECISIONS)}.")
    key = precision.lower()
    if key in _REFUSED:
        raise ValueError(
            f"precision={precision!r} for {name} is refused: {_REFUSED[key]}, and 16-bit Gram "
            "matrices lose the spectrum's tail (H100, mean offset 0.5: 1271 of 3072 eigenvalues "
            "negative with bf16). Use 'bf16-split' (bf16 tensor cores, fp32-level accuracy), "
            "'fp32' or 'fp64'."
        )
    if key != "auto" and key not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} for {name}; choose one of "
                         f"{('auto', *PRECISIONS)}.")
    return key


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu", *,
                      gram_dtype: torch.dtype | None = None) -> str:
    """The concrete mode (``"fp64"``, ``"fp32"`` or ``"bf16-split"``) used on ``device``.

    Examples
    --------
    >>> resolve_precision("auto", "cpu"), resolve_precision(gram_dtype=torch.float32)
    ('fp32', 'fp32')
    """
    p = check_precision(precision, gram_dtype)
    return default_precision(device) if p == "auto" else p


def gram_dtype_of(precision: str) -> torch.dtype:
    """Dtype of the per-batch scatter matrix a concrete mode forms (its accumulation type)."""
    return _PRECISION_GRAM_DTYPE[precision]


# ------------------------------------------------------------------ matmul guard
_FP32_BACKENDS = ("cuda", "mkldnn")


@contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Forbid TF32 / bf16-decomposed float32 matmuls and reduced-precision bf16 reductions.

    Sets ``torch.backends.{cuda,mkldnn}.matmul.fp32_precision = "ieee"`` (the legacy
    ``allow_tf32`` flag on torches without it) and
    ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False`` for the
    duration, then restores what the user had. Only float32 Gram products run inside it: the
    model's own matmuls (between ``.output`` reads of an nnsight trace) are unaffected.
    """
    saved: list[tuple[Any, str, Any]] = []
    try:
        for backend in _FP32_BACKENDS:
            mm = getattr(getattr(torch.backends, backend, None), "matmul", None)
            if mm is not None and hasattr(mm, "fp32_precision"):
                saved.append((mm, "fp32_precision", mm.fp32_precision))
                mm.fp32_precision = "ieee"
        cuda_mm = torch.backends.cuda.matmul
        if not hasattr(cuda_mm, "fp32_precision"):  # torch < 2.9
            saved.append((cuda_mm, "allow_tf32", cuda_mm.allow_tf32))
            cuda_mm.allow_tf32 = False
        saved.append((cuda_mm, "allow_bf16_reduced_precision_reduction",
                      cuda_mm.allow_bf16_reduced_precision_reduction))
        cuda_mm.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


# ------------------------------------------------------------------ bf16 split
_MM_OUT_DTYPE: dict[str, bool] = {}


def _gram_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ b`` of two bf16 ``[N, D]`` tensors with float32 accumulation and output.

    CUDA: one bf16 tensor-core GEMM with ``out_dtype=torch.float32`` where torch has it.
    Elsewhere (and as the fallback): widen to float32 (exact) and multiply in float32, which
    is the same arithmetic (a product of two bf16 numbers is exact in float32).
    """
    dev = a.device.type
    if dev == "cuda" and _MM_OUT_DTYPE.get(dev, True):
        try:
            return torch.mm(a.T, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without out_dtype
            _MM_OUT_DTYPE[dev] = False
    return a.float().T @ b.float()


def bf16_split(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split float32 values into ``hi + lo``, both bfloat16.

    Parameters
    ----------
    d : torch.Tensor of shape (N, D), float32
        Centred activations.

    Returns
    -------
    hi, lo : torch.Tensor of shape (N, D), bfloat16
        ``hi = bf16(d)``, ``lo = bf16(d − hi)``; ``hi + lo == d`` exactly when ``d`` has at
        most 16 significant bits (true for differences of nearby bf16 numbers).

    Examples
    --------
    >>> d = torch.tensor([[1.0 + 2.0**-10, -3.0]])
    >>> hi, lo = bf16_split(d)
    >>> (hi.float() + lo.float() - d).abs().max().item()
    0.0
    """
    hi = d.to(_BF16)
    lo = (d - hi.float()).to(_BF16)
    return hi, lo


def bf16_split_scatter(hi: torch.Tensor, lo: torch.Tensor, *,
                       include_lo_lo: bool = True) -> torch.Tensor:
    """``(hi + lo)ᵀ(hi + lo)`` from three bf16 products with float32 accumulation.

    ``hiᵀhi + (hiᵀlo + (hiᵀlo)ᵀ) + loᵀlo``; the cross term is formed once and added with
    its transpose (the product is symmetric). Small terms are summed first.

    Parameters
    ----------
    hi, lo : torch.Tensor of shape (N, D), bfloat16
        From :func:`bf16_split`.
    include_lo_lo : bool, default True
        ``False`` drops ``loᵀlo`` (for benchmarks and tests only: it is ~100× worse in the
        tail on heavy-tailed data).

    Returns
    -------
    torch.Tensor of shape (D, D), float32
    """
    cross = _gram_fp32(hi, lo)
    out = _gram_fp32(lo, lo) if include_lo_lo else torch.zeros_like(cross)
    out += cross
    out += cross.T
    out += _gram_fp32(hi, hi)
    return out


def exact_diagonal(xc: torch.Tensor) -> torch.Tensor:
    """Column sums of squares ``Σ_n xc[n, i]²`` in float64: the diagonal of ``xcᵀxc``.

    A float32 Gram product rounds every partial sum of its diagonal, and when the values
    have short significands (bf16 numbers, or the ``hi`` of a bf16 split) the squares share
    their low bits (an odd significand squared ends in ``…001``), so the rounding errors do
    not cancel: they add up to a *negative bias* on every diagonal entry. On heavy-tailed
    bf16 data with a dense covariance over 5 decades (D=256, 2048 rows per update) that bias
    was −1.3e-4 per entry, about 3e-3 of the smallest eigenvalues, and it was the whole
    excess error of ``"bf16-split"`` over ``"fp32"``. Summing the squares in float64 costs
    O(N·D), against the O(N·D²) of the product, and removes it.

    Parameters
    ----------
    xc : torch.Tensor of shape (N, D)
        Centred activations, float32 (or any float dtype). Squared exactly in float64, in
        chunks of at most 2²⁴ elements (a 128 MB temporary).

    Returns
    -------
    torch.Tensor of shape (D,), float64

    Examples
    --------
    >>> xc = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    >>> exact_diagonal(xc).tolist()
    [10.0, 4.25]
    """
    rows = max(1, _DIAGONAL_CHUNK // max(1, xc.shape[1]))  # bounds the float64 temporary
    out = torch.zeros(xc.shape[1], dtype=torch.float64, device=xc.device)
    for part in xc.split(rows):
        out += part.double().square_().sum(dim=0)  # squares exact: ≤ 48 significant bits
    return out


_DIAGONAL_CHUNK = 1 << 24
"""Elements per float64 chunk in :func:`exact_diagonal` (128 MB)."""


_ROW_CHUNK = 1 << 17
"""Elements per float64 chunk of :func:`batch_mean` and :func:`centre_rows` (1 MB: a chunk,
its square and its float32 rows stay in one core's L2 cache, so each batch's rows are read
from memory twice, however many sums are taken of them)."""


def _row_chunks(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Rows per chunk, and a float64 vector of that many ones (for column sums as BLAS
    matrix-vector products: a float64 ``sum(dim=0)`` of float32 rows cost a third of the
    Gram product at D = 1536)."""
    rows = max(1, _ROW_CHUNK // max(1, int(x.shape[1])))
    return rows, torch.ones(min(int(x.shape[0]), rows), dtype=torch.float64, device=x.device)


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """The exact column mean of rows ``x`` ``[N, D]`` (any float dtype), in float64: each
    chunk is widened exactly and summed by a BLAS product.

    Examples
    --------
    >>> batch_mean(torch.tensor([[1.0, -2.0], [3.0, 0.5]])).tolist()
    [2.0, -0.75]
    """
    rows, ones = _row_chunks(x)
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    with full_precision_matmul():
        for part in x.split(rows):
            mean.addmv_(part.double().T, ones[:part.shape[0]])
    return mean.div_(max(1, int(x.shape[0])))


class CentredRows(NamedTuple):
    """What :func:`centre_rows` returns (float64 unless said)."""

    xc: torch.Tensor
    """(N, D) float32: ``x − s``, rounded once."""
    mean: torch.Tensor
    """(D,): ``μ``, the exact mean."""
    resid: torch.Tensor
    """(D,): ``Σ(x − s)``."""
    diag: torch.Tensor
    """(D,): ``Σ(x − s)²``."""
    moments: BatchMoments | None
    """The batch's :class:`~nerve_interp.moments.BatchMoments` when ``delta`` was given."""


def shift_of(mean: torch.Tensor, bf16_shift: bool = False) -> torch.Tensor:
    """The shift ``s`` :func:`centre_rows` centres on: the float64 mean rounded to float32
    (to bfloat16 with ``bf16_shift``), as float64."""
    return (mean.to(_BF16) if bf16_shift else mean.float()).double()


def centre_rows(x: torch.Tensor, mean: torch.Tensor | None = None, *, bf16_shift: bool = False,
                delta: torch.Tensor | None = None, norms2: torch.Tensor | None = None,
                shift: torch.Tensor | None = None, out: torch.Tensor | None = None
                ) -> CentredRows:
    """Centre rows on their mean for a float32 Gram product, with every sum in float64, in
    one pass over chunks of rows that stay in cache.

    Each chunk is widened to float64 (exactly) and shifted by ``s``, the mean ``μ`` rounded
    to float32 (to bfloat16 with ``bf16_shift``), so ``x − s`` is exact in float64 for
    float32 (bf16, fp16) rows. Its column sums (the residual of the shift), its sums of
    squares (the diagonal, as :func:`exact_diagonal`) and, with ``delta``, the batch's
    fourth-moment sums (:class:`~nerve_interp.moments.MomentSums`) come from the same
    widened chunk before it is narrowed to the float32 rows of the product. float64 rows are
    centred in float64 before that one rounding: rounding them first would lose what an
    offset hides (at ``|μ| = 1e3`` a float32 ulp is 6e-5 of a unit-variance deviation).
    ``x`` is never modified.

    Parameters
    ----------
    x : torch.Tensor of shape (N, D), float64, float32, bfloat16 or float16
    mean : torch.Tensor of shape (D,), float64, optional
        ``x``'s exact mean (:func:`batch_mean`), when the caller has it already.
    bf16_shift : bool
        Round the shift to bfloat16 (``"bf16-split"``: then ``x − s`` is exact in float32 for
        bf16 inputs).
    delta : torch.Tensor of shape (D,), float64, optional
        The batch's offset ``δ_b`` for its :class:`~nerve_interp.moments.NormMoments`
        (:meth:`~nerve_interp.moments.NormMoments.offset`); None: no moments.
    norms2 : torch.Tensor of shape (N,), float64, optional
        Filled with each row's ``‖x − s‖²`` (from the same widened chunks).
    shift : torch.Tensor of shape (D,), float64, optional
        ``s`` itself, when it is not :func:`shift_of` ``mean`` (a float32- or
        bfloat16-representable vector).
    out : torch.Tensor of shape (N, D), float32, optional
        Where to write ``xc`` (returned as it), instead of a new tensor.

    Returns
    -------
    CentredRows
        ``(xc, mean, resid, diag, moments)``.

    Examples
    --------
    >>> xc, mean, resid, diag, _ = centre_rows(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    >>> mean.tolist(), resid.tolist(), diag.tolist()
    ([2.0, -0.75], [0.0, 0.0], [2.0, 3.125])
    """
    n, d = x.shape
    mean = batch_mean(x) if mean is None else mean
    rows, ones = _row_chunks(x)
    shift = shift_of(mean, bf16_shift) if shift is None else shift
    sums = None if delta is None else MomentSums(mean - shift, delta)
    xc = torch.empty(n, d, dtype=torch.float32, device=x.device) if out is None else out
    if xc.shape != (n, d) or xc.dtype != torch.float32:
        raise ValueError(f"out must be float32 of shape {(n, d)}; got {xc.dtype} of shape "
                         f"{tuple(xc.shape)}.")
    resid = torch.zeros(d, dtype=torch.float64, device=x.device)
    diag = torch.zeros(d, dtype=torch.float64, device=x.device)
    wide = torch.empty(min(n, rows), d, dtype=torch.float64, device=x.device)
    with full_precision_matmul():
        for start, part in zip(range(0, n, rows), x.split(rows), strict=True):
            k = int(part.shape[0])
            w = torch.sub(part, shift, out=wide[:k])  # exact for float32 rows; x is kept
            xc[start:start + k] = w
            resid.addmv_(w.T, ones[:k])
            if sums is None:
                diag.addmv_(w.square_().T, ones[:k])
                if norms2 is not None:
                    torch.sum(w, 1, out=norms2[start:start + k])
                continue
            sq = w.square()
            diag.addmv_(sq.T, ones[:k])
            row2 = sq.sum(1) if norms2 is None else torch.sum(sq, 1, out=norms2[start:start + k])
            sums.add(w, row2)
    return CentredRows(xc, mean, resid, diag, None if sums is None else sums.result())


MASSIVE_ROW_FACTOR = 64.0
"""Rows whose ``‖x − s‖²`` exceeds this many times their batch's median (norm 8× the median)
enter the scatter through a float64 product (:func:`massive_rows`)."""


def massive_rows(norms2: torch.Tensor, factor: float = MASSIVE_ROW_FACTOR) -> torch.Tensor:
    """Indices of the rows of *massive activations*: ``‖x − s‖²`` above ``factor`` × the
    batch's median (or its mean, when the median is 0).

    A float32 product's round-off is relative to the energy of the rows it sums, so one
    attention-sink token with 500× the median norm (SmolLM2-135M, ``post`` of layer 11) sets
    the error of every entry, and its pull on the batch mean offsets every other row; taking
    it out again (``without_outliers``) left that error in a covariance 10⁴× smaller (the
    smallest eigenvalue came out 83% low). :meth:`CovarianceAccumulator.update` therefore
    centres the other rows on their own mean and multiplies these in float64: a few rows per
    batch, O(k·D²) against the product's O(N·D²).

    Examples
    --------
    >>> massive_rows(torch.tensor([1.0, 2.0, 1.5, 5000.0], dtype=torch.float64)).tolist()
    [3]
    """
    typical = norms2.median()
    typical = typical if bool(typical > 0) else norms2.mean()
    return (norms2 > factor * typical).nonzero().squeeze(1)


# ------------------------------------------------------------------ symmetric Gram
PANEL_WIDTH = 192
"""Columns per panel of :func:`add_upper_gram` (8 panels at D = 1536). Against 128 columns
(12 panels, 54% of the products' multiply-adds instead of 56%) a whole update took 0.98×
as long at 2 threads (rounds of 24 points alternated in one process, D = 1536, ~1,000
rows) and the same at 1 thread: a third fewer calls, and each product splits better over
two threads."""


def panels(d: int, width: int = PANEL_WIDTH) -> list[tuple[int, int]]:
    """Column ranges ``[i, j)`` of width ``width`` (the last one shorter) that tile ``0..d``.

    Examples
    --------
    >>> panels(300, 128)
    [(0, 128), (128, 256), (256, 300)]
    """
    return [(i, min(i + width, d)) for i in range(0, d, width)]


def add_upper_gram(m2: torch.Tensor, xc: torch.Tensor, *, width: int = PANEL_WIDTH,
                   low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                   before: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Add ``xcᵀxc`` to the *upper block triangle* of ``m2``, in place: half the products.

    For each panel ``[i, j)`` of :func:`panels`, ``m2[i:j, i:] += xc[:, i:j]ᵀ xc[:, i:]``:
    the diagonal blocks in full, the blocks right of them, nothing below (the symmetric
    half, :func:`fill_lower`, is copied once when it is read). With 8 panels that is
    (8 + 1) / 16 = 56% of the full product's multiply-adds, as one GEMM per panel (a BLAS
    ``syrk`` was no faster than these on MKL). A float64 ``xc`` is multiplied straight into
    ``m2`` (``addmm``); a float32 one into a float32 panel that is then added (widened
    exactly) to the float64 ``m2``. On the CPU the float32 panels are multiplied through
    oneDNN where torch has it (:mod:`nerve_interp._onednn`: MKL runs AVX2 kernels on AMD
    CPUs; 1.9x faster on an AVX-512 EPYC), else by ``torch.mm``; TF32 and bf16-decomposed
    products are forbidden while they run (:func:`full_precision_matmul`).

    Parameters
    ----------
    m2 : torch.Tensor of shape (D, D), float64
        Its upper block triangle is updated; the rest is not read or written.
    xc : torch.Tensor of shape (N, D), float64 or float32
        Centred rows, on ``m2``'s device.
    width : int
        Panel width.
    low_rank : (torch.Tensor, torch.Tensor) of shape (D, k) each, float64, optional
        Also add ``u vᵀ`` to the same blocks, each while it is in cache (the rank-one
        corrections of an update: :func:`add_upper_low_rank` without its own pass).
    before : (torch.Tensor, torch.Tensor) of shape (D,) each, float64, optional
        ``(v, out)``: also ``out += S v`` for the symmetric ``S`` whose upper block triangle
        ``m2`` holds *before* this call, each block read just before it is updated (what
        :func:`upper_matvec` gives, without its own pass over ``m2``: the fourth moments
        need it for every update, 0.8 ms at D = 1536).

    Returns
    -------
    torch.Tensor of shape (D,), float64
        The diagonal of ``xcᵀxc`` as the products formed it and ``m2`` received it (for
        :func:`exact_diagonal`'s correction).
    """
    d = int(xc.shape[1])
    with full_precision_matmul():
        if xc.dtype != m2.dtype and xc.shape[0] and _uses_onednn(xc):  # 0 rows: torch.mm
            return _add_upper_gram_onednn(m2, xc, width, low_rank, before)
        diag = torch.empty(d, dtype=torch.float64, device=xc.device)
        narrow = xc.dtype != m2.dtype
        room = scratch("panel", (min(width, d) * d,), xc.dtype, xc.device) if narrow else None
        for i, j in panels(d, width):
            block = m2[i:j, i:]
            if before is not None:
                _block_matvec(block, i, j, *before)
            if not narrow:
                block.addmm_(xc[:, i:j].T, xc[:, i:])
                diag[i:j] = block[:, :j - i].diagonal()  # unused for float64 (no correction)
            else:
                part = room[:(j - i) * (d - i)].view(j - i, d - i)
                torch.mm(xc[:, i:j].T, xc[:, i:], out=part)
                diag[i:j] = part[:, :j - i].diagonal()
                block.add_(part)
            if low_rank is not None:
                block.addmm_(low_rank[0][i:j], low_rank[1][i:].T)
    return diag


ONEDNN_ROWS = 256
"""Rows per float32 product of :func:`add_upper_gram` through oneDNN. oneDNN's kernels sum a
whole batch in one float32 chain, where MKL's ``sgemm`` sums blocks of rows and then adds the
blocks' products: over 2,048 rows per update one chain tripled the tail eigenvalue error of
the heavy-tailed benchmark case (2.7e-4 against MKL's 9.1e-5). Products of at most 256 rows,
added in float32, gave 1.1e-4 (9.2e-5 when each was added to the float64 state instead, which
took 1.2 ms more per update at D = 1536; 3.7e-5 with 128 rows, 10-20% slower)."""

ONEDNN_PAD = 64
"""The last block of a batch is padded with zero rows up to a multiple of this, not to
:data:`ONEDNN_ROWS`: oneDNN then sees at most ``ONEDNN_ROWS / ONEDNN_PAD`` = 4 row counts
per panel (one cached primitive each), and a batch wastes at most 63 rows of products
instead of 255 (at D = 1536 and 2 threads one panel set took 0.54, 0.93, 1.30 and 1.67 ms
for 64, 128, 192 and 256 rows)."""


def _add_upper_gram_onednn(m2: torch.Tensor, xc: torch.Tensor, width: int,
                           low_rank: LowRank | None,
                           before: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> torch.Tensor:
    """:func:`add_upper_gram` of float32 CPU rows through oneDNN: each panel is the float32
    sum of products of blocks of :data:`ONEDNN_ROWS` rows (the last one padded with zero
    rows, which add exact zeros, to a multiple of :data:`ONEDNN_PAD`), added to ``m2`` in
    float64; returns the panels' diagonals (float64).

    The products have a few shapes whatever the batch's row count: oneDNN caches one
    primitive (~0.7 MB) per shape it sees, so blocks sized by the row count made a
    capture's memory grow with its number of distinct batch sizes (+0.37 GB over 65.6k
    tokens at 4 points). The blocks are written into a buffer reused across updates
    (:mod:`nerve_interp._scratch`)."""
    n, d = (int(s) for s in xc.shape)
    diag = torch.empty(d, dtype=torch.float64, device=xc.device)
    starts = range(0, n, ONEDNN_ROWS)
    room = scratch("onednn_blocks", (len(starts) * d * ONEDNN_ROWS,), torch.float32, xc.device)
    blocks = []
    for b, s in enumerate(starts):
        rows = xc[s:s + ONEDNN_ROWS]
        k = int(rows.shape[0])
        width_b = -(-k // ONEDNN_PAD) * ONEDNN_PAD
        xct = room[b * d * ONEDNN_ROWS:][:d * width_b].view(d, width_b)
        xct[:, :k].copy_(rows.T)
        xct[:, k:].zero_()
        blocks.append(xct)
    for i, j in panels(d, width):
        block = m2[i:j, i:]
        part = _onednn.rows_times_rows(blocks[0][i:j], blocks[0][i:])
        for xct in blocks[1:]:  # float32 sums of block sums, as MKL's sgemm adds its own
            part += _onednn.rows_times_rows(xct[i:j], xct[i:])
        diag[i:j] = part[:, :j - i].diagonal()
        if before is not None:
            _block_matvec(block, i, j, *before)
        block.add_(part)
        if low_rank is not None:
            block.addmm_(low_rank[0][i:j], low_rank[1][i:].T)
    return diag


def _block_matvec(block: torch.Tensor, i: int, j: int, v: torch.Tensor, out: torch.Tensor
                  ) -> None:
    """``out += S[:, i:j] v[i:j] + S[i:j, j:] v[j:]`` (in place) for the symmetric ``S`` whose
    row panel ``[i, j)`` of the upper block triangle is ``block = S[i:j, i:]``: summed over
    the panels of :func:`panels`, ``S v``."""
    out[i:].addmv_(block.T, v[i:j])  # the panel's blocks, transposed ...
    out[i:j].addmv_(block[:, j - i:], v[j:])  # ... and right of the diagonal, as they are


def _uses_onednn(xc: torch.Tensor) -> bool:
    """Whether :func:`add_upper_gram` multiplies these float32 CPU rows through oneDNN
    (:mod:`nerve_interp._onednn`: 1.9x MKL's speed on an AVX-512 AMD CPU)."""
    return xc.device.type == "cpu" and xc.dtype == torch.float32 and _onednn.available()


def add_upper_low_rank(m2: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                       upper: bool, width: int = PANEL_WIDTH) -> None:
    """``m2 += u vᵀ`` in place, on the upper block triangle only when ``upper``.

    Parameters
    ----------
    m2 : torch.Tensor of shape (D, D), float64
    u, v : torch.Tensor of shape (D, k), float64
        Low-rank factors (the rank-one corrections of an update, stacked: one pass over
        ``m2`` instead of one per correction).
    upper : bool
        Update only the upper block triangle of :func:`panels` (the lower one is stale).
    """
    if not upper:
        m2.addmm_(u, v.T)
        return
    for i, j in panels(int(m2.shape[0]), width):
        m2[i:j, i:].addmm_(u[i:j], v[i:].T)


def fill_lower(m2: torch.Tensor, *, width: int = PANEL_WIDTH) -> None:
    """Copy the upper triangle of ``m2`` onto its lower one (in place): exactly symmetric.

    Parameters
    ----------
    m2 : torch.Tensor of shape (D, D)
        Its blocks below the diagonal blocks of :func:`panels` are overwritten with the
        transposes of those above, and each diagonal block's lower triangle with its upper.
    """
    for i, j in panels(int(m2.shape[0]), width):
        m2[j:, i:j].copy_(m2[i:j, j:].T)
        block = m2[i:j, i:j]
        block.copy_(block.triu() + block.triu(1).T)


def upper_matvec(m2: torch.Tensor, v: torch.Tensor, *, width: int = PANEL_WIDTH
                 ) -> torch.Tensor:
    """``S v`` for the symmetric ``S`` whose upper block triangle ``m2`` holds.

    Parameters
    ----------
    m2 : torch.Tensor of shape (D, D)
        Only its upper block triangle (diagonal blocks in full) is read.
    v : torch.Tensor of shape (D,)

    Returns
    -------
    torch.Tensor of shape (D,)
    """
    out = torch.zeros_like(v)
    for i, j in panels(int(m2.shape[0]), width):
        _block_matvec(m2[i:j, i:], i, j, v, out)
    return out


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


class CovarianceAccumulator:
    """Streaming covariance of ``[N, D]`` activations with an exact, order-free merge.

    Parameters
    ----------
    name : str, optional
        What the statistics are of (e.g. ``"layers.3.ffn.pre"``); used in error messages.
    precision : {"auto", "fp64", "fp32", "bf16-split"}, default "auto"
        How each batch's centred scatter matrix is formed (module docstring): ``"auto"`` is
        ``"fp64"`` on CPU and ``"fp32"`` on CUDA, decided on the first batch. The
        running state is float64 in every mode. ``"bf16"``, ``"fp16"`` and ``"tf32"`` are
        refused with an explanation.
    gram_dtype : torch.float64 or torch.float32, optional
        Older synonym of ``precision`` (``"fp64"`` / ``"fp32"``).

    Attributes
    ----------
    precision : str
        The mode asked for (``"auto"`` until resolved in ``precision_``).
    precision_ : str or None
        The mode in use, once the first batch has fixed it (None before, if ``"auto"``).
    n_samples_seen_ : int
        Number of rows (tokens) folded in so far.
    mean_ : torch.Tensor of shape (D,), float64
        Column mean of every row seen.
    scatter_ : torch.Tensor of shape (D, D), float64
        ``M2 = Σ (x − μ)(x − μ)ᵀ``.
    covariance_ : torch.Tensor of shape (D, D), float64
        ``M2 / (n − 1)``, equal to ``numpy.cov(X, rowvar=False)``.

    Examples
    --------
    >>> import torch
    >>> acc = CovarianceAccumulator(name="demo")
    >>> x = torch.randn(100, 8, dtype=torch.float64) + 1e3
    >>> _ = acc.update(x[:30]).update(x[30:])
    >>> acc.covariance_.shape, acc.precision_
    (torch.Size([8, 8]), 'fp32')
    >>> bool(torch.allclose(acc.covariance_, torch.cov(x.T)))
    True
    """

    def __init__(self, name: str = "activations", *, precision: str = "auto",
                 gram_dtype: torch.dtype | None = None):
        self.name = name
        self.precision = check_precision(precision, gram_dtype, name=name)
        self._resolved: str | None = None if self.precision == "auto" else self.precision
        self._n = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._stale = False  # True: only the upper block triangle of _m2 is up to date

    # ------------------------------------------------------------------ state
    @property
    def precision_(self) -> str | None:
        """The concrete accumulation mode, or None while ``"auto"`` awaits its first batch."""
        return self._resolved

    @property
    def gram_dtype(self) -> torch.dtype | None:
        """Accumulation dtype of the per-batch scatter (float32 for ``"bf16-split"``)."""
        return None if self._resolved is None else _PRECISION_GRAM_DTYPE[self._resolved]

    @property
    def dim(self) -> int | None:
        """Width D of the rows, or None before the first batch."""
        return None if self._mean is None else int(self._mean.shape[0])

    def _fitted(self, attr: str) -> None:
        if self._n == 0:
            raise NotFittedError(
                f"CovarianceAccumulator for {self.name} has seen 0 tokens, so {attr} is not "
                "defined; call update(batch) or collect_spectra(...) first."
            )

    @property
    def n_samples_seen_(self) -> int:
        return self._n

    @property
    def mean_(self) -> torch.Tensor:
        self._fitted("mean_")
        return self._mean

    @property
    def scatter_(self) -> torch.Tensor:
        self._fitted("scatter_")
        return self._symmetric()

    def _symmetric(self) -> torch.Tensor:
        """``M2`` in full: the lower blocks are copied from the upper ones when stale."""
        if self._stale:
            fill_lower(self._m2)
            self._stale = False
        return self._m2

    def scatter_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``M2 v`` (float64, shape (D,)) without completing ``M2`` first."""
        self._fitted("scatter_matvec()")
        v = v.to(self._m2.device, torch.float64)
        return upper_matvec(self._m2, v) if self._stale else self._m2 @ v

    def scatter_trace(self) -> torch.Tensor:
        """``tr M2 = Σ_n ‖x_n − μ‖²`` (a float64 scalar tensor)."""
        self._fitted("scatter_trace()")
        return self._m2.diagonal().sum()

    @property
    def covariance_(self) -> torch.Tensor:
        self._fitted("covariance_")
        if self._n < 2:
            raise NotFittedError(
                f"CovarianceAccumulator for {self.name} has seen 1 token; an unbiased "
                "covariance needs at least 2."
            )
        return self._symmetric() / (self._n - 1)

    # ---------------------------------------------------------------- updates
    def _fold(self, n_b: int, mean_b: torch.Tensor,
              add_scatter: Callable[[torch.Tensor, LowRank | None], bool],
              resid: torch.Tensor | None = None) -> None:
        """Chan's update, in place: ``add_scatter(M2, low_rank)`` adds the batch's own
        ``M2_b`` and the rank-one corrections ``low_rank`` (``u vᵀ``, or None), returning True
        when it updated only the upper block triangle; the corrections are
        ``−resid residᵀ / n_b`` when ``resid`` (``Σ(x − s)`` around the batch's shift) is
        given, and Chan's ``δ δᵀ · n_a n_b / n``.

        Adding ``M2_b`` straight into the float64 state saves a D×D float64 temporary
        (1.6 GB at D = 14336) per update; the two rank-one corrections go in as one rank-two
        product, on the CPU block by block with the Gram (no pass over ``M2`` of their own).
        """
        if self._mean is None:
            d = int(mean_b.shape[0])
            self._mean = torch.zeros(d, dtype=torch.float64, device=mean_b.device)
            self._m2 = torch.zeros(d, d, dtype=torch.float64, device=mean_b.device)
        elif mean_b.shape != self._mean.shape:
            raise CaptureError(
                f"{self.name}: got rows of width {mean_b.shape[0]} after rows of width "
                f"{self._mean.shape[0]}; every batch of one point must have the same D."
            )
        mean_b = mean_b.to(self._mean.device)
        n_a, n = self._n, self._n + n_b
        delta = mean_b - self._mean
        u, v = [], []
        if resid is not None:
            resid = resid.to(self._m2.device)
            u, v = [resid], [resid * (-1.0 / n_b)]
        if n_a:
            u, v = [*u, delta], [*v, delta * (n_a * n_b / n)]
        low_rank = (torch.stack(u, 1), torch.stack(v, 1)) if u else None
        self._stale = bool(add_scatter(self._m2, low_rank)) or self._stale
        self._mean += delta * (n_b / n)
        self._n = n

    def update(self, x: Any, moments: NormMoments | None = None) -> CovarianceAccumulator:
        """Fold a batch of rows into the statistics.

        Parameters
        ----------
        x : torch.Tensor or array-like of shape (N, D)
            Activations of one point, tokens as rows (padding already removed). Any float
            dtype and device; it is centred on (a rounding of) its own mean and its scatter
            matrix is formed in the accumulator's precision on the same device. ``N = 0`` is
            a no-op.
        moments : NormMoments, optional
            Fold the same rows into this fourth-moment statistic first (as
            ``moments.update(x, self)``, which must see the scatter before the batch), from
            the rows as this update centres them (no second pass over ``x``).

        Returns
        -------
        self
        """
        x = _as_tensor(x)
        if x.ndim != 2:
            raise ValueError(
                f"x for {self.name} must be 2-D [N, D] (tokens × FFN width); got shape "
                f"{tuple(x.shape)}. Flatten batch and sequence first: "
                "x.reshape(-1, x.shape[-1]), dropping padding."
            )
        n_b = int(x.shape[0])
        if n_b == 0:
            return self
        if self._resolved is None:
            self._resolved = default_precision(x.device)
        if self._resolved == "fp64":
            mean_b = x.sum(dim=0, dtype=torch.float64) / n_b  # the exact mean
            self._check_finite(x, mean_b)
            xc = x.to(torch.float64, copy=True).sub_(mean_b)
            resid = xc.sum(dim=0)  # ≈ 0: the exact correction for the mean's rounding
            if moments is not None:  # the centred rows, not a second widening of x
                sums = MomentSums(torch.zeros_like(mean_b), moments.offset(mean_b, n_b))
                sums.add(xc, torch.linalg.vector_norm(xc, dim=1) ** 2)
                moments.fold(n_b, mean_b, sums.result(), self)
            self._fold(n_b, mean_b, lambda m2, low: self._add_scatter(m2, xc, None, low),
                       resid)
            return self
        # below float64: chunks widened once give the residual, the diagonal and the
        # moments; the moments' M2 d_a is taken in the Gram's own pass over M2
        mean_b = batch_mean(x)
        self._check_finite(x, mean_b)
        xc, resid, diag, wide, batch = self._centre(
            x, mean_b, None if moments is None else moments.offset(mean_b, n_b))
        d_a = None if moments is None else moments.recentring(mean_b, n_b)
        tr_a = None if d_a is None else self.scatter_trace()
        before = None if d_a is None else (d_a.to(self._m2.device),
                                          torch.zeros_like(d_a, device=self._m2.device))
        self._fold(n_b, mean_b,
                   lambda m2, low: self._add_scatter(m2, xc, diag, low, wide, before), resid)
        if moments is not None:
            moments.fold(n_b, mean_b, batch, self,
                         before=None if before is None else (tr_a, before[1]))
        return self

    def _centre(self, x: torch.Tensor, mean_b: torch.Tensor, delta: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
        """:func:`centre_rows` for a product below float64, with the :func:`massive_rows`
        taken out: when there are any, the rows are centred again on the shift of the
        others' mean, and the massive ones come back in float64 for their own product.

        Returns ``(xc, resid, diag, wide, moments)``; ``wide`` (k, D) float64 or None."""
        bf16 = self._resolved == "bf16-split"
        norms2 = torch.empty(int(x.shape[0]), dtype=torch.float64, device=x.device)
        room = scratch("centred", tuple(x.shape), torch.float32, x.device)
        xc, _, resid, diag, batch = centre_rows(x, mean_b, bf16_shift=bf16, delta=delta,
                                                norms2=norms2, out=room)
        big = massive_rows(norms2)
        if big.numel() == 0:
            return xc, resid, diag, None, batch
        rows = x.index_select(0, big).double()
        rest = (mean_b * x.shape[0] - rows.sum(0)) / max(1, int(x.shape[0]) - big.numel())
        shift = shift_of(rest, bf16)
        xc, _, resid, diag, batch = centre_rows(x, mean_b, delta=delta, shift=shift, out=room)
        xc.index_fill_(0, big, 0.0)
        return xc, resid, diag, rows.sub_(shift), batch

    def _check_finite(self, x: torch.Tensor, mean_b: torch.Tensor) -> None:
        """Raise on NaN/inf rows. A NaN/inf anywhere makes its column's float64 sum
        non-finite (a float64 sum of finite float32/bf16 values cannot overflow), so D checks
        stand in for N·D."""
        if bool(torch.isfinite(mean_b).all()):
            return
        n_b = int(x.shape[0])
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        if not bad:
            raise CaptureError(
                f"{self.name}: the column sums of {n_b} finite tokens overflow (largest "
                f"|value| {float(x.abs().max()):.3g}); rescale the activations.")
        raise CaptureError(
            f"{self.name}: {bad} of {n_b} tokens have NaN/inf activations. Check the "
            "model's dtype (fp16 overflows easily; load in float32 or bfloat16) and inputs."
        )

    def _add_scatter(self, m2: torch.Tensor, xc: torch.Tensor, diag: torch.Tensor | None,
                     low_rank: LowRank | None, wide: torch.Tensor | None = None,
                     before: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
        """Add the centred rows' scatter ``xcᵀxc`` to ``m2`` (its float64 ``diag`` in place
        of the product's), the float64 rows ``wide``'s (:func:`massive_rows`) and
        ``low_rank``; True when only the upper block triangle was updated (on the CPU,
        :func:`add_upper_gram`; elsewhere one full product). ``before = (v, out)``: also
        ``out += M2 v`` of ``m2`` as it was (see :func:`add_upper_gram`)."""
        if before is not None and (xc.device.type != "cpu" or xc.device != m2.device
                                   or self._resolved == "bf16-split"):
            before[1].add_(self.scatter_matvec(before[0]))  # no pass of the Gram's to share
            before = None
        wide = None if wide is None else wide.to(m2.device)
        formed_wide = 0.0 if wide is None else wide.square().sum(0)
        with full_precision_matmul():
            if self._resolved == "bf16-split":
                hi, lo = bf16_split(xc)
                gram = bf16_split_scatter(hi, lo)
                del hi, lo
            elif xc.device.type != "cpu" or xc.device != m2.device:
                gram = xc.T @ xc
            else:
                formed = add_upper_gram(m2, xc, low_rank=low_rank, before=before)
                if wide is not None:
                    add_upper_gram(m2, wide)
                if diag is not None:
                    m2.diagonal().add_(diag - formed.to(m2) - formed_wide)
                return len(panels(int(xc.shape[1]))) > 1
            m2.add_(gram.to(m2.device))  # float32 → float64 in place, no temporary
            if wide is not None:
                m2.addmm_(wide.T, wide)
        if diag is not None:
            m2.diagonal().add_(diag.to(m2.device) - gram.diagonal().to(m2) - formed_wide)
        return self._add_low_rank(m2, low_rank)

    def _add_low_rank(self, m2: torch.Tensor, low_rank: LowRank | None) -> bool:
        """``m2 += u vᵀ`` (on the upper block triangle when the state is stale); False: the
        scatter added before it (a full product, or another accumulator's full ``M2``)
        updated every block."""
        if low_rank is not None:
            add_upper_low_rank(m2, *low_rank, upper=self._stale)
        return False

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another accumulator's statistics into this one (exact, in float64).

        ``a.merge(b)`` equals an accumulator that saw ``a``'s rows and then ``b``'s, whatever
        precision each used. Returns ``self``; ``other`` is not modified.
        """
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"merge() takes a CovarianceAccumulator; got {type(other).__name__}.")
        if other._n:
            if self._resolved is None:
                self._resolved = other._resolved
            self._fold(other._n, other._mean,
                       lambda m2, low: self._add_low_rank(
                           m2.add_(other._symmetric().to(m2.device)), low))
        return self

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the state: ``n`` (int64), ``mean`` and ``scatter``."""
        self._fitted("state_dict()")
        return {
            "n": torch.tensor(self._n, dtype=torch.int64),
            "mean": self._mean.detach().cpu().clone(),
            "scatter": self._symmetric().detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> CovarianceAccumulator:
        """Restore a state written by :meth:`state_dict` (checked for shape and type)."""
        missing = {"n", "mean", "scatter"} - set(state)
        if missing:
            raise ResultsFileError(
                f"state for {self.name} lacks {sorted(missing)}; expected the keys of "
                "CovarianceAccumulator.state_dict() (n, mean, scatter)."
            )
        n = int(state["n"])
        mean = _as_tensor(state["mean"]).to(torch.float64)
        m2 = _as_tensor(state["scatter"]).to(torch.float64)
        d = mean.shape[0] if mean.ndim == 1 else -1
        if n < 1 or mean.ndim != 1 or tuple(m2.shape) != (d, d):
            raise ResultsFileError(
                f"state for {self.name} is inconsistent: n={n}, mean {tuple(mean.shape)}, "
                f"scatter {tuple(m2.shape)}; expected n >= 1, (D,) and (D, D)."
            )
        self._n, self._mean, self._m2 = n, mean.clone(), m2.clone()
        self._stale = False
        return self

    def to(self, device: torch.device | str) -> CovarianceAccumulator:
        """Move the state to ``device`` (in place); returns self."""
        if self._mean is not None:
            self._mean, self._m2 = self._mean.to(device), self._m2.to(device)
        return self

    def __repr__(self) -> str:
        return (f"CovarianceAccumulator({self.name!r}, n={self._n}, D={self.dim}, "
                f"precision={self._resolved or self.precision!r})")


__all__ = [
    "PANEL_WIDTH",
    "PRECISIONS",
    "CovarianceAccumulator",
    "add_upper_gram",
    "add_upper_low_rank",
    "batch_mean",
    "bf16_split",
    "bf16_split_scatter",
    "centre_rows",
    "check_precision",
    "default_precision",
    "exact_diagonal",
    "fill_lower",
    "full_precision_matmul",
    "gram_dtype_of",
    "panels",
    "resolve_precision",
    "upper_matvec",
]
