"""nerve_interp benchmark suite: capture throughput, accumulation accuracy, eigh cost, memory.

Run::

    make bench                                  # full CPU run, ~3 min on 2 cores
    python benchmarks/bench.py --quick          # CI-size smoke run, seconds
    python benchmarks/bench.py --parts accuracy,eigh --out my.json

Every number is measured in this one run, side by side; ratios are taken within a
repetition (variants interleaved round-robin) and the median over repetitions is reported.
On a shared machine timings are noisy (±15% between runs on 2 cores), so read differences
below ~10% as noise. A table is printed and everything is written as JSON to
``benchmarks/results/bench-<time>.json`` (or ``--out``).

Parts
-----
throughput
    Plain forward vs ``collect_spectra`` (nnsight) vs raw torch hooks, same batches, same
    accumulator, per accumulation precision; tokens/s and ratios to the plain forward.
    CPU: TinyLM ``small`` (random init, random tokens) and SmolLM2-135M (python-docs text).
    CUDA, when present: GPT-2-small-shaped and LLaMA-130M-shaped TinyLMs in bf16, random
    init, random tokens (skipped cleanly without CUDA).
accuracy
    Each accumulation mode, and the unsafe references (uncentred fp32, uncentred bf16,
    TF32 on CUDA only, bf16-split with a float32 diagonal or without lo'lo) against
    numpy float64 on heavy-tailed
    bf16-valued data with a mean offset: median / top-decile / tail-decile relative
    eigenvalue error (worst in the decile), negative eigenvalues, and time per update
    relative to fp32.
eigh
    ``spectrum_from_covariance`` (float64 eigvalsh on the host) time vs D, through numpy's
    LAPACK (OpenBLAS, the default) and torch's (MKL) side by side, one at a time and two in
    flight: which is faster on this machine (``NERVE_INTERP_LAPACK`` picks).
directions
    The second pass of ``explain_directions`` (``run_pass``: read one ``post`` point, project
    onto d directions, heaps and per-token sums; O(N·D·d)) as a ratio to a plain forward of
    the same tokens, for a middle and the last layer (where the pass cannot stop early) and
    d = 16, 64. CPU: TinyLM ``small`` and SmolLM2-135M.
memory
    Peak memory of a capture vs token count (fresh subprocess per N on CPU, ``ru_maxrss``
    above the model's own footprint; ``torch.cuda.max_memory_allocated`` on CUDA): the
    statistics are D×D, so it should be flat in N.
peer
    Ours (``collect_spectra`` with its defaults, eigendecompositions included; and its
    streaming part alone) against NerVE's analyzer method (keep every batch's pre and post
    rows on the CPU, then a float32 covariance and float32 ``eigvalsh`` per point), each in a
    fresh process per size after a plain forward of the same batches: seconds as a ratio to
    that forward, and peak memory. SmolLM2-135M on python-docs batches of the defaults (8
    texts × 256 tokens): all 60 points at 4k, 8k and 16k tokens, layers 0-1 (4 points) at 64k
    (every point's rows would need 24 GB); these children run with a fixed mmap threshold
    (:data:`MALLOC_FOR_RSS`) so that RSS follows live memory. At every size, ``--reps``
    rounds side by side in one more process, with glibc's default allocator (as users run),
    in rotation: plain forward (not at 64k, where both methods stop after layer 1), each
    method's whole call and streaming part alone, and NerVE's method with a float64
    ``eigvalsh`` (ours decomposes in float64), so "ours / NerVE's" is a ratio from one
    process. ``--quick``: TinyLM, 256 and 1024 tokens.
    The longest part (~2 h with ``--reps 2``); ``--peer-tokens 4096,8192`` picks sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_throughput import module_and_io, plain_forward, raw_hook_capture  # noqa: E402

import nerve_interp  # noqa: E402
import nerve_interp.capture.finish as capture_mod  # noqa: E402
import nerve_interp.groups as groups_mod  # noqa: E402
from nerve_interp import _lapack  # noqa: E402
from nerve_interp._inflight import map_in_flight  # noqa: E402
from nerve_interp.capture import collect_spectra  # noqa: E402
from nerve_interp.covariance import (  # noqa: E402
    CovarianceAccumulator,
    bf16_split,
    bf16_split_scatter,
    exact_diagonal,
    full_precision_matmul,
)
from nerve_interp.sites import as_nnsight, find_ffn_sites  # noqa: E402
from nerve_interp.spectrum import Spectrum, spectrum_from_covariance  # noqa: E402

PARTS = ("throughput", "accuracy", "eigh", "directions", "memory", "peer")
# opt-in parts (not in the default run): the README's examples as written, ~15 min on 2 cores
EXTRA_PARTS = ("readme",)
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-size run (tiny sizes, 1 rep)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated of {PARTS + EXTRA_PARTS} (default: {PARTS})")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-smollm", action="store_true", help="skip SmolLM2-135M (throughput)")
    p.add_argument("--gpu-only", action="store_true",
                   help="only the CUDA cases of throughput and accuracy (make gpu-check)")
    p.add_argument("--memory-tokens", type=lambda t: tuple(int(v) for v in t.split(",")),
                   default=None, help="token counts N of the memory part, e.g. 2048,8192")
    p.add_argument("--peer-tokens", type=lambda t: tuple(int(v) for v in t.split(",")),
                   default=None, help="token counts of the peer part, e.g. 4096,8192")
    p.add_argument("--peer-threads", type=lambda t: tuple(int(v) for v in t.split(",")),
                   default=None, help="torch threads of the peer part's runs (default: 1 and "
                                      "every core; --quick: the torch default)")
    args = p.parse_args(argv)
    bad = set(args.parts.split(",")) - set(PARTS + EXTRA_PARTS)
    if bad:
        p.error(f"unknown part(s) {sorted(bad)}; choose from {PARTS + EXTRA_PARTS}")
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.gpu_only:
        if not torch.cuda.is_available():
            p.error("--gpu-only needs a CUDA device; torch.cuda.is_available() is False.")
        if args.parts == ",".join(PARTS):
            args.parts = "throughput,accuracy"
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _random_batches(n_batches: int, batch: int, seq: int, vocab: int, device: Any,
                    seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device),
                    "attention_mask": torch.ones_like(ids).to(device)})
    return out


# ------------------------------------------------------------------ (a) throughput
@contextmanager
def discard_eigh():
    """Skip collect_spectra's eigendecomposition; the covariance it was handed is dropped.

    (``capture_throughput.stub_eigh`` keeps every covariance for its correctness check;
    with 60 points of D = 1536 the fresh pages that needs cost seconds, which the raw-hook
    variant, dropping each covariance at once, does not pay.)
    """
    def fake(covariance, mean, n_samples, *, eigenvectors=False, name="spectrum", warn=True):
        d = int(covariance.shape[0])
        return Spectrum(eigenvalues=np.zeros(d), mean=np.zeros(d), n_samples=int(n_samples),
                        name=name)

    def fake_groups(m2, n):  # the leave-one-group-out / convergence eigvalsh of n_groups
        return np.zeros(int(m2.shape[0]))

    with mock.patch.object(capture_mod, "spectrum_from_covariance", fake), \
            mock.patch.object(groups_mod, "_eigenvalues", fake_groups):
        yield


def throughput_case(label: str, model: torch.nn.Module, ref_model: torch.nn.Module,
                    batches: list[dict], precisions: list[str], reps: int) -> dict:
    """Time plain / nnsight / raw-hook capture side by side on the same batches."""
    device = next(model.parameters()).device
    wrapper = as_nnsight(model)
    sites = find_ffn_sites(wrapper)
    reads = [(s.name(p), *module_and_io(s.path(p)), p) for s in sites for p in ("pre", "post")]
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)

    def nn(prec: str, diagnostics: bool = False, n_groups: int | None = None) -> None:
        with discard_eigh(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # outlier-token warnings, once per rep
            collect_spectra(wrapper, batches, points=("pre", "post"), progress=False,
                            precision=prec, diagnostics=diagnostics, n_groups=n_groups,
                            memory_budget=None if n_groups is None else 1e12)

    # "nnsight <mode>" forms the same statistics as the raw hooks (token diagnostics off);
    # "+ diagnostics" is collect_spectra's default, which also keeps per-token norm statistics
    variants: dict[str, Any] = {"plain": lambda: plain_forward(ref_model, batches)}
    for prec in precisions:
        variants[f"nnsight {prec}"] = lambda p=prec: nn(p)
        variants[f"raw {prec}"] = lambda p=prec: raw_hook_capture(ref_model, batches, reads,
                                                                  precision=p)
    variants[f"nnsight {precisions[0]} + diagnostics"] = lambda: nn(precisions[0], True)
    # per-group statistics (the streaming part; the extra eigendecompositions are discarded
    # like the others): K = 16 where the batches hold >= 16 sequences
    k = min(16, sum(int(b["input_ids"].shape[0]) for b in batches))
    variants[f"nnsight {precisions[0]} + diagnostics + groups"] = \
        lambda: nn(precisions[0], True, k)
    for fn in variants.values():  # warm-up, untimed
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps):
        names = list(variants)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        row = {"variant": name, "times_s": ts, "median_s": statistics.median(ts),
               "tokens_per_s": n_tok / statistics.median(ts),
               "x_plain": _median_ratio(ts, times["plain"])}
        if name.startswith("nnsight"):
            row["nnsight_over_raw"] = _median_ratio(ts, times["raw " + name.split()[1]])
        if name.endswith("groups"):
            row["n_groups"] = k
            row["x_ungrouped"] = _median_ratio(ts, times[name.removesuffix(" + groups")])
        rows.append(row)
    p0 = next(model.parameters())
    return {"case": label, "device": str(device), "dtype": str(p0.dtype).replace("torch.", ""),
            "sites": len(reads), "D": sorted({int(s) for s in _dims(wrapper, sites, batches)}),
            "tokens": n_tok, "batches": len(batches), "reps": reps, "rows": rows}


def _dims(wrapper: Any, sites: list, batches: list[dict]) -> list[int]:
    dims: list[int] = []
    b = {k: v[:1, :4] for k, v in batches[0].items()}
    with torch.no_grad(), wrapper.trace(**b) as tracer:
        for s in sites:
            for p in ("pre", "post"):
                dims.append(int(wrapper.get(s.path(p)).shape[-1]))
        tracer.stop()
    return dims


def bench_throughput(args: argparse.Namespace) -> list[dict]:
    from nerve_interp.models import make_lm

    if args.gpu_only:
        return bench_throughput_gpu(args)
    cases = []
    cpu_prec = ["fp32", "fp64"]  # the first is collect_spectra's default ("auto")
    small = dict(n_layers=2, d_model=64) if args.quick else {}
    m, ref = (make_lm("small", seed=0, **small).eval() for _ in range(2))
    nb, bs, seq = (1, 2, 32) if args.quick else (4, 8, 128)
    cases.append(throughput_case("TinyLM small (cpu, fp32 weights)", m, ref,
                                 _random_batches(nb, bs, seq, 256, "cpu"), cpu_prec, args.reps))
    if not args.no_smollm and not args.quick:
        from nerve_interp.data import load_corpus, tokenize_batches
        from nerve_interp.zoo import load_model

        m, tok = load_model("smollm2-135m")
        ref, _ = load_model("smollm2-135m")
        # seed=None: the same four documents as in earlier runs, so timings stay comparable
        texts = load_corpus("python-docs", seed=None)[:4]
        batches = list(tokenize_batches(texts, tok, batch_size=4, max_length=96))
        cases.append(throughput_case("SmolLM2-135M (cpu, fp32 weights)", m, ref, batches,
                                     cpu_prec, min(args.reps, 2)))
        del m, ref
    cases.extend(bench_throughput_gpu(args))
    return cases


def bench_throughput_gpu(args: argparse.Namespace, device: str = "cuda",
                         presets: tuple[str, ...] = ("gpt2-small", "llama-130m"),
                         shape: tuple[int, int, int] | None = None,
                         overrides: dict | None = None) -> list[dict]:
    """GPT-2-small- and LLaMA-shaped random-init bf16 models; [] without CUDA.

    ``device``/``shape``/``overrides`` let the fast test run this code path on a CPU.
    """
    from nerve_interp.models import make_lm

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("GPU throughput cases skipped: no CUDA device.")
        return []
    nb, bs, seq = shape or ((2, 4, 256) if args.quick else (4, 16, 1024))
    out = []
    for preset in presets:
        m, ref = (make_lm(preset, seed=0, **(overrides or {})).eval().to(device, torch.bfloat16)
                  for _ in range(2))
        vocab = m.config.vocab_size
        prec = ["fp64", "fp32", "bf16-split"]
        out.append(throughput_case(f"{preset} random init ({device}, bf16 weights)", m, ref,
                                   _random_batches(nb, bs, seq, vocab, device), prec,
                                   args.reps))
        del m, ref
    return out


# ------------------------------------------------------------------ (b) accuracy
def heavy_tailed_bf16(n: int, d: int, decades: float = 5.0, offset: float = 0.5,
                      seed: int = 0) -> torch.Tensor:
    """bf16-valued rows: t(4) tails, eigenvalues over ``decades`` decades, mean ``offset``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.logspace(0, -decades, d)
    z = rng.standard_t(df=4, size=(n, d)) / np.sqrt(2.0)
    return torch.from_numpy((z * np.sqrt(lam)) @ q.T + offset).to(torch.bfloat16)


class _Uncentred:
    """Reference only: G = Σ xᵀx per batch in ``dtype`` (fp64 across batches), exact mean."""

    def __init__(self, dtype: torch.dtype, tf32: bool = False):
        self.dtype, self.tf32, self.g, self.s, self.n = dtype, tf32, None, None, 0

    def update(self, x: torch.Tensor) -> _Uncentred:
        xx = x.to(self.dtype)
        g = (xx.T @ xx).double()
        self.g = g if self.g is None else self.g + g
        s = x.sum(0, dtype=torch.float64)
        self.s = s if self.s is None else self.s + s
        self.n += x.shape[0]
        return self

    @property
    def covariance_(self) -> torch.Tensor:
        mu = self.s / self.n
        return (self.g - self.n * torch.outer(mu, mu)) / (self.n - 1)


def _scatter_adder(g: torch.Tensor, r: torch.Tensor, n: int,
                   diag: torch.Tensor | None = None) -> Any:
    """The ``add_scatter`` of ``CovarianceAccumulator._fold`` for a reference variant: its
    Gram ``g`` (with the float64 ``diag`` in place of its own, if given), less
    ``r rᵀ / n`` for the shift's residual ``r``, and Chan's low-rank term; every block."""
    def add(m2: torch.Tensor, low_rank: tuple | None) -> bool:
        m2.add_(g)
        if diag is not None:
            m2.diagonal().add_(diag - g.diagonal().double())
        m2.addr_(r, r, alpha=-1.0 / n)
        if low_rank is not None:
            m2.addmm_(low_rank[0], low_rank[1].T)
        return False
    return add


class _CentredTF32:
    """Reference only (CUDA): fp32 centred update with TF32 explicitly allowed."""

    def __init__(self):
        self.acc = CovarianceAccumulator("tf32", precision="fp64")

    def update(self, x: torch.Tensor) -> _CentredTF32:
        mm = torch.backends.cuda.matmul
        old = mm.fp32_precision
        mm.fp32_precision = "tf32"
        try:
            mean = x.sum(0, dtype=torch.float64) / x.shape[0]
            xc = x.float() - mean.float()
            g = xc.T @ xc
            r = xc.sum(0, dtype=torch.float64)
        finally:
            mm.fp32_precision = old
        self.acc._fold(x.shape[0], mean, _scatter_adder(g, r, x.shape[0]))
        return self

    @property
    def covariance_(self) -> torch.Tensor:
        return self.acc.covariance_


class _SplitVariant:
    """Reference only: bf16-split without the lo'lo product and/or the float64 diagonal."""

    def __init__(self, lo_lo: bool = True, float64_diagonal: bool = True):
        self.acc = CovarianceAccumulator("split-variant", precision="fp64")
        self.lo_lo, self.float64_diagonal = lo_lo, float64_diagonal

    def update(self, x: torch.Tensor) -> _SplitVariant:
        n = x.shape[0]
        mean = x.sum(0, dtype=torch.float64) / n
        d = x.float() - mean.to(torch.bfloat16).float()
        with full_precision_matmul():
            hi, lo = bf16_split(d)
            g = bf16_split_scatter(hi, lo, include_lo_lo=self.lo_lo)
        r = d.sum(0, dtype=torch.float64)
        diag = exact_diagonal(d) if self.float64_diagonal else None

        self.acc._fold(n, mean, _scatter_adder(g, r, n, diag))
        return self

    @property
    def covariance_(self) -> torch.Tensor:
        return self.acc.covariance_


def _modes(device: torch.device) -> dict[str, Any]:
    modes: dict[str, Any] = {
        "fp64": lambda: CovarianceAccumulator("fp64", precision="fp64"),
        "fp32": lambda: CovarianceAccumulator("fp32", precision="fp32"),
        "bf16-split": lambda: CovarianceAccumulator("split", precision="bf16-split"),
        "UNSAFE split, float32 diagonal": lambda: _SplitVariant(float64_diagonal=False),
        "UNSAFE split without lo'lo": lambda: _SplitVariant(lo_lo=False),
        "UNSAFE uncentred fp32": lambda: _Uncentred(torch.float32),
        "UNSAFE uncentred bf16": lambda: _Uncentred(torch.bfloat16),
    }
    if device.type == "cuda":
        modes["UNSAFE fp32 with TF32"] = _CentredTF32
    return modes


def accuracy_case(device: torch.device, n: int, d: int, chunk: int, reps: int) -> dict:
    x = heavy_tailed_bf16(n, d)
    ref = np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False))[::-1]
    k = max(1, d // 10)
    xd = x.to(device)
    batches = list(xd.split(chunk))
    modes = _modes(device)
    rows = {}
    for name, make in modes.items():
        acc = make()
        for b in batches:
            acc.update(b)
        ev = np.linalg.eigvalsh(acc.covariance_.double().cpu().numpy())[::-1]
        rel = np.abs(ev - ref) / ref
        rows[name] = {"mode": name, "median_rel_err": float(np.median(rel)),
                      "top_decile_rel_err": float(rel[:k].max()),
                      "tail_decile_rel_err": float(rel[-k:].max()),
                      "n_negative": int((ev < 0).sum())}
    times: dict[str, list[float]] = {m: [] for m in modes}
    one = batches[0]
    for make in modes.values():  # warm-up
        make().update(one)
    for r in range(reps):
        names = list(modes)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            acc = modes[name]()
            _sync(device)
            t0 = time.perf_counter()
            acc.update(one)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    for name in modes:
        rows[name]["update_s"] = statistics.median(times[name])
        rows[name]["time_vs_fp32"] = _median_ratio(times[name], times["fp32"])
    return {"device": str(device), "N": n, "D": d, "rows_per_update": chunk,
            "data": "t(4) rows, eigenvalues over 5 decades, mean offset 0.5, bf16 values; "
                    "reference numpy float64 cov of the same bf16 values",
            "rows": list(rows.values())}


def bench_accuracy(args: argparse.Namespace) -> list[dict]:
    n, d, chunk = (2048, 64, 512) if args.quick else (16384, 1024, 2048)
    out = [] if args.gpu_only else [accuracy_case(torch.device("cpu"), n, d, chunk, args.reps)]
    if torch.cuda.is_available():
        n, d, chunk = (4096, 256, 1024) if args.quick else (65536, 3072, 16384)
        out.append(accuracy_case(torch.device("cuda"), n, d, chunk, args.reps))
    else:
        print("GPU accuracy case skipped: no CUDA device.")
    return out


# ------------------------------------------------------------------ (c) eigh vs D
def _eigvalsh_with(lapack: str, covs: list[torch.Tensor], workers: int) -> float:
    """Seconds per covariance of ``spectrum_from_covariance`` over ``covs`` through ``lapack``'s
    LAPACK (:mod:`nerve_interp._lapack`), ``workers`` at a time."""
    with mock.patch.dict(os.environ, {_lapack.ENV: lapack}):
        t0 = time.perf_counter()
        for _ in map_in_flight(lambda c: spectrum_from_covariance(
                c, np.zeros(c.shape[0]), 10 * c.shape[0], warn=False), covs, workers=workers):
            pass
        return (time.perf_counter() - t0) / len(covs)


def bench_eigh(args: argparse.Namespace) -> dict:
    """Seconds per float64 eigvalsh vs D through each LAPACK (numpy's OpenBLAS, torch's MKL),
    one at a time on every thread and (with >= 2 threads) two in flight, the variants
    alternated in rounds; ``numpy_over_torch`` < 1: numpy's is faster here."""
    dims = (32, 64, 128) if args.quick else (256, 512, 1024, 1536, 2048, 4096)
    rng = np.random.default_rng(0)
    workers = (1, 2) if torch.get_num_threads() >= 2 else (1,)
    rows = []
    for d in dims:
        a = rng.standard_normal((d, d + 8))
        covs = [torch.from_numpy(a @ a.T / (d + 8))] * (2 if d >= 2048 else 4)
        t: dict[tuple[str, int], list[float]] = {}
        for _ in range(1 if d >= 2048 else args.reps):
            for key in ((lp, w) for w in workers for lp in _lapack.BACKENDS):
                t.setdefault(key, []).append(_eigvalsh_with(key[0], covs, key[1]))
        med = {k: statistics.median(v) for k, v in t.items()}
        row = {"D": d, "eigvalsh_s": med[(_lapack.backend(d), 1)], "auto": _lapack.backend(d)}
        for w in workers:
            row |= {f"{lp}_w{w}_s": med[(lp, w)] for lp in _lapack.BACKENDS}
            row[f"numpy_over_torch_w{w}"] = med[("numpy", w)] / med[("torch", w)]
        rows.append(row)
    x = np.log([r["D"] for r in rows])
    y = np.log([r["eigvalsh_s"] for r in rows])
    slope = float(np.polyfit(x[-3:], y[-3:], 1)[0])
    return {"rows": rows, "loglog_slope_last3": slope,
            "last_level_cache_bytes": _lapack.last_level_cache_bytes(),
            "note": "float64 eigvalsh on the host, once per point per capture; wN: N in "
                    "flight (nerve_interp._inflight), seconds per decomposition"}


# ------------------------------------------------------------------ (d) memory vs N
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_reset_peak() -> int:
    """Current RSS in bytes, after returning freed heap to the OS and resetting the peak.

    ``malloc_trim`` first, so later allocations need fresh pages rather than reusing freed
    ones unseen; then VmHWM is reset where Linux allows it. ``ru_maxrss`` cannot serve:
    Linux keeps it across fork + exec, so a child inherits the parent's peak.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    rss = _status_kb("VmRSS")
    return rss * 1024 if rss is not None else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    hwm = _status_kb("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_memory(n_tokens: int, device: str, quick: bool) -> dict:
    """Run in a fresh process: peak memory of one capture of n_tokens above the baseline."""
    from nerve_interp.models import make_lm

    warnings.filterwarnings("ignore")
    dev = torch.device(device)
    kw = dict(n_layers=2, d_model=64)
    model = make_lm("small", seed=0, **kw).eval().to(dev)
    seq = 32 if quick else 128
    bs = 4 if quick else 8
    n_b = -(-n_tokens // (bs * seq))
    batches = _random_batches(n_b, bs, seq, 256, dev)
    collect_spectra(model, batches[:1], progress=False)  # warm-up: allocator, nnsight
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_reset_peak()
    res = collect_spectra(model, batches, progress=False, max_tokens=n_tokens)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = _peak_rss()
    # sensitivity check of the measurement: keeping every row of layer 0's pre (what the
    # accumulators avoid) must show up as growth ∝ N
    kept: list[torch.Tensor] = []
    mod_path, io = module_and_io(find_ffn_sites(as_nnsight(model))[0].path("pre"))
    hook = model.get_submodule(mod_path).register_forward_hook(
        lambda m, a, o: kept.append((a[0] if io == "input" else o).detach().clone()))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_keep = torch.cuda.memory_allocated(dev)
    else:
        base_keep = _rss_reset_peak()
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    peak_keep = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss()
    kept.clear()
    return {"N": res.metadata["n_tokens"], "peak_above_baseline_bytes": max(0, peak - base),
            "keep_rows_reference_bytes": max(0, peak_keep - base_keep),
            "baseline_bytes": base, "D": int(res.spectrum(0, "pre").dim),
            "points": len(list(res.items()))}


MALLOC_FOR_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""glibc settings of a child that measures memory: large blocks come from mmap and go back on
free, so RSS follows live memory (glibc's dynamic threshold keeps freed blocks in the heap).
They also make every large temporary a fresh mmap whose pages fault in: a plain forward of
8.8k SmolLM2 tokens took 39 s under them against 27 s without (2 threads), and a capture
that allocates per product 1.8x its plain forward against 1.2-1.3x. Time is therefore
measured side by side in a child with glibc's defaults, as users run."""


def _child_env(for_memory: bool = True) -> dict[str, str]:
    """The environment of a measuring child process: this nerve_interp first on the path,
    and :data:`MALLOC_FOR_RSS` when it measures memory (else glibc's defaults)."""
    root = str(Path(nerve_interp.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_FOR_RSS}
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    return {**env, **(MALLOC_FOR_RSS if for_memory else {})}


def _child_command(call: str, threads: int | None = None) -> list[str]:
    """A fresh Python that imports this file and prints ``RESULT <json of bench.<call>>``."""
    torch_threads = f"import torch; torch.set_num_threads({threads}); " if threads else ""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"{torch_threads}import bench; print('RESULT', json.dumps(bench.{call}))")
    return [sys.executable, "-c", code]


def _child_result(what: str, returncode: int, stdout: str, stderr: str) -> dict:
    """The ``RESULT`` line of a child's output, or a RuntimeError with its stderr's tail."""
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if returncode or not line:
        raise RuntimeError(f"{what} failed:\n{stderr[-2000:]}")
    return json.loads(line[0][7:])


def bench_memory(args: argparse.Namespace) -> list[dict]:
    ns = args.memory_tokens or ((256, 1024) if args.quick else (2048, 8192, 32768))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        procs = []
        for n in ns:  # one fresh process per N, run side by side (each measures only itself)
            procs.append((n, subprocess.Popen(
                _child_command(f"_child_memory({n}, {device!r}, {args.quick})"),
                env=_child_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        rows = []
        for n, proc in procs:
            stdout, stderr = proc.communicate(timeout=900)
            rows.append(_child_result(f"memory child for N={n}", proc.returncode, stdout,
                                      stderr))
        how = ("peak RSS (VmHWM, reset after loading and one warm-up capture) of a fresh "
               "process, above its RSS then" if device == "cpu" else
               "torch.cuda.max_memory_allocated above memory_allocated after warm-up")
        out.append({"device": device, "how": how, "rows": rows})
    return out


# ------------------------------------------------------------------ (e) directions
def _time_round_robin(variants: dict[str, Any], reps: int, device: torch.device,
                      warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each variant: one untimed warm-up (unless ``warm_up=False``), then
    ``reps`` rounds with the order rotated every round."""
    for fn in variants.values() if warm_up else ():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps):
        names = list(variants)
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def directions_case(label: str, model: torch.nn.Module, batches: list[dict], ds: list[int],
                    reps: int) -> dict:
    """run_pass at a middle and the last layer, d directions, vs a plain forward."""
    from nerve_interp.capture.collect import vocab_size
    from nerve_interp.directions import DirectionOptions, DirectionStats, run_pass

    device = next(model.parameters()).device
    wrapper = as_nnsight(model)
    sites = find_ffn_sites(wrapper)
    width = _dims(wrapper, sites[-1:], batches)[-1]
    vocab = vocab_size(model, None)
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    opts = DirectionOptions(max_tokens=None)

    def second_pass(site: Any, basis: torch.Tensor) -> None:
        stats = DirectionStats(basis, torch.zeros(width, dtype=torch.float64), 20, 12, 4,
                               vocab)
        run_pass(wrapper, site, "post", batches, None, stats, opts)

    variants: dict[str, Any] = {"plain": lambda: plain_forward(model, batches)}
    g = torch.Generator().manual_seed(0)
    for site in (sites[len(sites) // 2], sites[-1]):
        for d in ds:
            basis = torch.linalg.qr(torch.randn(width, d, generator=g, dtype=torch.float64))[0]
            variants[f"layer {site.layer}, d={d}"] = \
                lambda s=site, b=basis: second_pass(s, b)
    times = _time_round_robin(variants, reps, device)
    rows = [{"variant": name, "median_s": statistics.median(ts),
             "tokens_per_s": n_tok / statistics.median(ts),
             "x_plain": _median_ratio(ts, times["plain"])} for name, ts in times.items()]
    return {"case": label, "D": width, "layers": len(sites), "tokens": n_tok,
            "batches": len(batches), "reps": reps, "rows": rows}


def bench_directions(args: argparse.Namespace) -> list[dict]:
    from nerve_interp.models import make_lm

    small = dict(n_layers=2, d_model=64) if args.quick else {}
    m = make_lm("small", seed=0, **small).eval()
    nb, bs, seq = (1, 2, 32) if args.quick else (4, 8, 128)
    ds = [16] if args.quick else [16, 64]
    cases = [directions_case("TinyLM small (cpu, fp32 weights)", m,
                             _random_batches(nb, bs, seq, 256, "cpu"), ds, args.reps)]
    if not args.no_smollm and not args.quick:
        from nerve_interp.data import load_corpus, tokenize_batches
        from nerve_interp.zoo import load_model

        m, tok = load_model("smollm2-135m")
        texts = load_corpus("python-docs", seed=None)[:8]
        batches = list(tokenize_batches(texts, tok, batch_size=4, max_length=128))
        cases.append(directions_case("SmolLM2-135M (cpu, fp32 weights)", m, batches, ds,
                                     args.reps))
    return cases


def bench_readme(args: argparse.Namespace) -> list[dict]:
    """Every README Python block as written (``--quick``: scaled as in tests/test_readme.py),
    in order, in one namespace, in a temporary folder; each block's wall time beside the time
    it states (the budget: the upper end of ``~a-b min``)."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    from readme_blocks import python_blocks, run_blocks

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            rows = run_blocks(python_blocks(), scale=args.quick)
        finally:
            os.chdir(here)
    for r in rows:
        r["scaled"] = args.quick
    return rows


# ------------------------------------------------------------------ (f) peer: NerVE's analyzer
class _StopForward(Exception):
    """Raised by the peer's last hook: its forward stops where ours does (tracer.stop())."""


def nerve_analyzer_spectra(model: torch.nn.Module, batches: list[dict], reads: list[tuple],
                           eigvalsh: str = "fp32") -> dict[str, torch.Tensor]:
    """NerVE's analyzer method (``nerve/analyzer.py``, ``nerve/metrics.py`` @35a8f95 of
    github.com/nerve-eigenspectrum/NerVE; notes/papers.md §1.2-1.3), over several batches.

    Hooks keep every batch's pre and post rows (here only the real tokens, the rows ours
    counts) in float32 on the CPU; then, point by point, ``Σ = (X − μ)ᵀ(X − μ) / (N − 1)`` in
    float32 and float32 ``eigvalsh``, sorted descending and clamped at 1e-12, freeing each
    point's rows as it goes. The forward stops after the last point read (as ours does).

    ``eigvalsh``: ``"fp32"`` (NerVE's own), ``"fp64"`` (the same float32 covariance
    decomposed in float64, as ours decomposes: what the precision of the decomposition
    costs) or ``"none"`` (the method's streaming and covariances alone, no decomposition).

    Returns
    -------
    dict name -> torch.Tensor of shape (D,), eigenvalues (float32 for ``"fp32"``; empty
    for ``"none"``)
    """
    if eigvalsh not in ("fp32", "fp64", "none"):
        raise ValueError(f"eigvalsh must be 'fp32', 'fp64' or 'none'; got {eigvalsh!r}.")
    kept: dict[str, list[torch.Tensor]] = {name: [] for name, *_ in reads}
    state: dict[str, Any] = {}
    last = reads[-1][0]

    def make(name: str, io: str):
        def take(x: torch.Tensor) -> None:
            rows = x.reshape(-1, x.shape[-1]).index_select(0, state["idx"])
            kept[name].append(rows.float().cpu())
            if name == last:
                raise _StopForward
        if io == "input":
            return lambda module, args: take(args[0])
        return lambda module, args, output: take(output)

    handles = []
    for name, mod_path, io, _ in reads:
        module = model.get_submodule(mod_path)
        handles.append(module.register_forward_pre_hook(make(name, io)) if io == "input"
                       else module.register_forward_hook(make(name, io)))
    try:
        with torch.no_grad():
            for batch in batches:
                state["idx"] = batch["attention_mask"].bool().reshape(-1).nonzero().squeeze(1)
                try:
                    model(**batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in list(kept):
        x = torch.cat(kept.pop(name))
        xc = x - x.mean(dim=0)
        cov = xc.T @ xc / (x.shape[0] - 1 + 1e-12)
        del x, xc
        if eigvalsh != "none":
            cov = cov.double() if eigvalsh == "fp64" else cov
            out[name] = torch.linalg.eigvalsh(cov).flip(-1).clamp_min(1e-12)
    return out


def _peer_setup(n_tokens: int, layers: tuple[int, ...] | None, quick: bool
                ) -> tuple[torch.nn.Module, list[dict], list[tuple]]:
    """The model, batches of at least ``n_tokens`` real tokens and the points read."""
    if quick:
        from nerve_interp.models import make_lm

        model = make_lm("small", seed=0, n_layers=2, d_model=64).eval()
        batches = _random_batches(-(-n_tokens // 128), 4, 32, 256, "cpu")
    else:
        from nerve_interp.data import load_corpus, tokenize_batches
        from nerve_interp.zoo import load_model

        model, tok = load_model("smollm2-135m")
        texts = load_corpus("python-docs", seed=None)
        batches, n = [], 0
        for b in tokenize_batches(texts, tok, batch_size=8, max_length=256):
            batches.append(b)
            n += int(b["attention_mask"].sum())
            if n >= n_tokens:
                break
    sites = find_ffn_sites(as_nnsight(model))
    sites = [s for s in sites if layers is None or s.layer in layers]
    reads = [(s.name(p), *module_and_io(s.path(p)), p) for s in sites for p in ("pre", "post")]
    return model, batches, reads


def _ours(model: torch.nn.Module, reads: list[tuple]) -> Any:
    """``collect_spectra`` with its defaults on the layers of ``reads``, as a function of the
    batches (eigendecompositions included, no progress bar)."""
    layer_ids = sorted({int(name.split(".")[1]) for name, *_ in reads})

    def ours(data: list[dict]) -> None:
        collect_spectra(model, data, layers=layer_ids, progress=False)

    return ours


def _child_peer(method: str, n_tokens: int, layers: tuple[int, ...] | None, quick: bool
                ) -> dict:
    """Run in a fresh process (with :data:`MALLOC_FOR_RSS`): a plain forward, then ``method``
    ("ours": collect_spectra with its defaults, eigendecompositions included; "nerve":
    :func:`nerve_analyzer_spectra`) on the same batches; seconds of each and the method's
    peak RSS above the baseline."""
    warnings.filterwarnings("ignore")
    model, batches, reads = _peer_setup(n_tokens, layers, quick)
    small = batches[:1]

    def nerve(data: list[dict]) -> None:
        nerve_analyzer_spectra(model, data, reads)

    run = {"ours": _ours(model, reads), "nerve": nerve}[method]
    run(small)  # warm-up: allocator, nnsight
    plain_s = float("nan")  # with a subset of layers both methods stop early: no ratio
    if layers is None:
        plain_forward(model, small)
        t0 = time.perf_counter()
        plain_forward(model, batches)
        plain_s = time.perf_counter() - t0
    base = _rss_reset_peak()
    t0 = time.perf_counter()
    run(batches)
    method_s = time.perf_counter() - t0
    peak = max(0, _peak_rss() - base)
    row = {"method": method, "N": sum(int(b["attention_mask"].sum()) for b in batches),
           "points": len(reads), "layers": "all" if layers is None else list(layers),
           "seconds": method_s, "plain_forward_s": plain_s, "x_plain": method_s / plain_s,
           "peak_above_baseline_bytes": peak, "baseline_bytes": base,
           "threads": torch.get_num_threads()}
    return row


def _child_peer_rounds(n_tokens: int, layers: tuple[int, ...] | None, quick: bool,
                       rounds: int) -> dict:
    """Run in a fresh process with glibc's default allocator (no :data:`MALLOC_FOR_RSS`):
    ``rounds`` rounds of :func:`_peer_rounds` (the done-when ratios of issue 19). With a
    subset of ``layers`` both methods stop after the last one, so the rounds have no plain
    forward and give only ours over NerVE's."""
    warnings.filterwarnings("ignore")
    model, batches, reads = _peer_setup(n_tokens, layers, quick)
    ours = _ours(model, reads)
    ours(batches[:1])  # warm-up: allocator, nnsight
    nerve_analyzer_spectra(model, batches[:1], reads)
    plain_forward(model, batches[:1])
    return {**_peer_rounds(model, batches, reads, ours, rounds, plain=layers is None),
            "rounds_allocator": "glibc defaults"}


def _round_key(key: str) -> str:
    """The key of each round's ratios behind the median under ``key``: ``"round_" + key``,
    except for the two names kept from the first version of the table."""
    return {"x_plain_median": "round_x_plain",
            "streaming_x_plain": "round_streaming_x_plain"}.get(key, "round_" + key)


def _peer_rounds(model: torch.nn.Module, batches: list[dict], reads: list[tuple], run: Any,
                 rounds: int, plain: bool = True) -> dict[str, Any]:
    """``rounds`` rounds, side by side in one process with the order rotated every round, of
    a plain forward (unless ``plain=False``) and of each method's whole call and streaming
    part alone (ours with the eigendecompositions discarded, NerVE's method with none), and
    NerVE's method with a float64 decomposition; each round's ratios to its own plain
    forward and ours over NerVE's, and their medians. (Ratios across processes are not
    comparable on a noisy machine: its plain forward varied 15-50% between processes.)"""
    def streaming() -> None:
        with discard_eigh():
            run(batches)

    def nerve(eig: str) -> Any:
        return lambda: nerve_analyzer_spectra(model, batches, reads, eigvalsh=eig)

    variants = {"plain": lambda: plain_forward(model, batches)} if plain else {}
    t = _time_round_robin({**variants, "whole": lambda: run(batches), "streaming": streaming,
                           "nerve": nerve("fp32"), "nerve_streaming": nerve("none"),
                           "nerve_fp64": nerve("fp64")},
                          rounds, torch.device("cpu"), warm_up=False)

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(t[a], t[b], strict=True)]

    row = {"rounds": rounds, "round_seconds": t, "round_load_avg": round(os.getloadavg()[0], 2)}
    pairs = {"ours_over_nerve": ("whole", "nerve"),
             "ours_over_nerve_fp64": ("whole", "nerve_fp64"),
             "streaming_over_nerve_streaming": ("streaming", "nerve_streaming")}
    if plain:
        pairs = {"x_plain_median": ("whole", "plain"), "streaming_x_plain": ("streaming", "plain"),
                 "nerve_x_plain": ("nerve", "plain"),
                 "nerve_streaming_x_plain": ("nerve_streaming", "plain"),
                 "nerve_fp64_x_plain": ("nerve_fp64", "plain"), **pairs}
    for key, (a, b) in pairs.items():
        row[_round_key(key)] = ratios(a, b)
        row[key] = statistics.median(row[_round_key(key)])
    return row


PEER_CASES = ((4096, None), (8192, None), (16384, None), (65536, (0, 1)))
"""``(tokens, layers)`` of the peer comparison (SmolLM2-135M; all 30 layers up to 16k tokens,
layers 0 and 1 at 64k, where keeping every point's rows would need 24 GB)."""


PEER_THREADED = (4096, 8192, 16384)
"""Token counts also run at every core (the 64k case, two layers, only at 1 thread)."""


def _peer_threads(args: argparse.Namespace) -> tuple[int, ...]:
    if args.peer_threads:
        return args.peer_threads
    if args.quick:
        return (torch.get_num_threads(),)
    return tuple(sorted({1, os.cpu_count() or 1}))


def _run_child(call: str, threads: int, for_memory: bool, what: str) -> dict:
    proc = subprocess.run(_child_command(call, threads=threads), env=_child_env(for_memory),
                          text=True, capture_output=True, timeout=3600)
    return _child_result(what, proc.returncode, proc.stdout, proc.stderr)


def bench_peer(args: argparse.Namespace) -> dict:
    """Ours (``collect_spectra`` defaults) vs NerVE's analyzer method: seconds (with a plain
    forward of the same batches in the same process) and peak memory, one fresh process per
    method, size and thread count, the two methods one right after the other."""
    cases = ((256, None), (1024, None)) if args.quick else PEER_CASES
    if args.peer_tokens:
        cases = tuple(c for c in cases if c[0] in args.peer_tokens) or tuple(
            (n, None) for n in args.peer_tokens)
    rows = []
    for threads in _peer_threads(args):
        for n, layers in cases:
            if threads > 1 and not args.quick and n not in PEER_THREADED:
                continue
            pair = {method: _run_child(f"_child_peer({method!r}, {n}, {layers!r}, {args.quick})",
                                       threads, True, f"peer child {method} N={n} "
                                                      f"threads={threads}")
                    for method in ("ours", "nerve")}
            if args.reps:
                call = f"_child_peer_rounds({n}, {layers!r}, {args.quick}, {args.reps})"
                pair["ours"].update(_run_child(call, threads, False,
                                               f"peer rounds N={n} threads={threads}"))
            rows += [pair["ours"], pair["nerve"]]
    return {"model": "TinyLM small, 2 layers" if args.quick else "SmolLM2-135M",
            "how": "fresh process per method, size and thread count, with a fixed mmap "
                   "threshold (MALLOC_FOR_RSS): seconds of the whole call (eigendecompositions "
                   "included) over a plain forward of the same batches in the same process, "
                   "peak RSS (VmHWM) above the RSS after loading and a warm-up; at every "
                   "size, rounds side by side in one more process with glibc's default "
                   "allocator (the fixed threshold slows allocation-heavy code)",
            "rows": rows}


# ------------------------------------------------------------------ report
def _fmt(x: float) -> str:
    return f"{x:.2e}" if (x and (abs(x) < 1e-2 or abs(x) >= 1e4)) else f"{x:.3g}"


def _print_peer_rounds(r: dict) -> None:
    """The side-by-side rounds of one size: each ratio's median and its rounds."""
    print(f"{'':9}{r['rounds']} rounds side by side in one process (load "
          f"{r['round_load_avg']}), medians (rounds):")
    for label, key in (("ours, whole call / plain", "x_plain_median"),
                       ("ours, streaming alone / plain", "streaming_x_plain"),
                       ("NerVE's method / plain", "nerve_x_plain"),
                       ("NerVE's method, streaming alone / plain", "nerve_streaming_x_plain"),
                       ("NerVE's method, float64 eigvalsh / plain", "nerve_fp64_x_plain"),
                       ("ours / NerVE's method", "ours_over_nerve"),
                       ("ours / NerVE's method with float64 eigvalsh", "ours_over_nerve_fp64"),
                       ("ours / NerVE's method, streaming alone",
                        "streaming_over_nerve_streaming")):
        if key in r:  # no plain forward in the rounds of a subset of layers
            print(f"{'':11}{label:<46}{r[key]:.2f} ("
                  + ", ".join(f"{x:.2f}" for x in r[_round_key(key)])
                  + ")")


def print_report(res: dict) -> None:
    print(f"\nnerve_interp benchmarks ({res['host']}); load avg at start {res['load_avg']}; "
          f"seconds per part {res.get('part_s')}")
    for case in res.get("throughput", []):
        print(f"\n[a] {case['case']}: {case['sites']} points, D {case['D']}, {case['tokens']} "
              f"tokens in {case['batches']} batches, {case['reps']} reps")
        print(f"  {'variant':<38}{'median s':>10}{'tokens/s':>12}{'x plain':>9}"
              f"{'nnsight/raw':>13}")
        for r in case["rows"]:
            nr = f"{r['nnsight_over_raw']:.3f}" if "nnsight_over_raw" in r else ""
            groups = (f"  (K = {r['n_groups']}: {r['x_ungrouped']:.2f}× ungrouped)"
                      if "n_groups" in r else "")
            print(f"  {r['variant']:<38}{r['median_s']:>10.3f}{r['tokens_per_s']:>12,.0f}"
                  f"{r['x_plain']:>9.2f}{nr:>13}{groups}")
    for case in res.get("accuracy", []):
        print(f"\n[b] accumulation accuracy on {case['device']}: N={case['N']}, D={case['D']}, "
              f"{case['rows_per_update']} rows per update ({case['data']})")
        print(f"  {'mode':<28}{'median':>10}{'top 10%':>10}{'tail 10%':>10}{'neg':>6}"
              f"{'update s':>10}{'x fp32':>8}")
        for r in case["rows"]:
            print(f"  {r['mode']:<28}{_fmt(r['median_rel_err']):>10}"
                  f"{_fmt(r['top_decile_rel_err']):>10}{_fmt(r['tail_decile_rel_err']):>10}"
                  f"{r['n_negative']:>6}{r['update_s']:>10.4f}{r['time_vs_fp32']:>8.2f}")
    if "eigh" in res:
        e = res["eigh"]
        print(f"\n[c] eigh (spectrum_from_covariance, fp64 eigvalsh) vs D; log-log slope of the "
              f"last 3: {e['loglog_slope_last3']:.2f}")
        print("  " + "  ".join(f"D={r['D']}: {r['eigvalsh_s']:.3f}s" for r in e["rows"]))
        print(f"  seconds per decomposition, numpy's LAPACK / torch's (w2 = two in flight; "
              f"last-level cache {e.get('last_level_cache_bytes')} bytes; auto picks):")
        for r in e["rows"]:
            print(f"  D={r['D']:>5} {r.get('auto', '?'):>5}" + "".join(
                f"   w{w}: {r[f'numpy_w{w}_s']:.4f} / {r[f'torch_w{w}_s']:.4f} s = "
                f"{r[f'numpy_over_torch_w{w}']:.2f}" for w in (1, 2) if f"numpy_w{w}_s" in r))
    for case in res.get("directions", []):
        print(f"\n[e] explain_directions' second pass vs a plain forward: {case['case']}, "
              f"{case['layers']} layers, post D={case['D']}, {case['tokens']} tokens, "
              f"{case['reps']} reps")
        for r in case["rows"]:
            print(f"  {r['variant']:<24}{r['median_s']:>10.3f} s{r['tokens_per_s']:>10,.0f} "
                  f"tok/s{r['x_plain']:>8.2f}x plain")
    if "peer" in res:
        pe = res["peer"]
        print(f"\n[f] ours (collect_spectra defaults) vs NerVE's analyzer method (buffer rows, "
              f"fp32 covariance, fp32 eigvalsh), {pe['model']}; {pe['how']}")
        for r in pe["rows"]:
            print(f"  {r['method']:<6} {r['threads']} thr N={r['N']:>7} ({r['points']} points, "
                  f"layers {r['layers']}): {r['seconds']:8.1f} s"
                  + (f" = {r['x_plain']:5.2f}x plain" if r["x_plain"] == r["x_plain"] else "")
                  + f", peak +{r['peak_above_baseline_bytes'] / 1e6:8.1f} MB")
            if "rounds" in r:
                _print_peer_rounds(r)


    if res.get("readme"):
        print("\n[g] README blocks (as written unless --quick), wall s vs the time they state")
        for r in res["readme"]:
            stated = "states no time" if r["stated_seconds"] is None else (
                f"stated ≤ {r['stated_seconds']:.0f} s: "
                + ("within" if r["within"] else "OVER BUDGET"))
            print(f"  README.md:{r['line']:<5}{r['seconds']:>8.1f} s   {stated}")
    for m in res.get("memory", []):
        print(f"\n[d] peak memory of collect_spectra vs N on {m['device']} ({m['how']})")
        for r in m["rows"]:
            print(f"  N={r['N']:>7}: +{r['peak_above_baseline_bytes'] / 1e6:8.1f} MB above "
                  f"a baseline of {r['baseline_bytes'] / 1e6:.0f} MB ({r['points']} points of "
                  f"D={r['D']}); reference, keeping one point's rows instead: "
                  f"+{r['keep_rows_reference_bytes'] / 1e6:.1f} MB "
                  f"(N·D·4 = {r['N'] * r['D'] * 4 / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*rank-deficient.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    if os.getloadavg()[0] >= 0.8 and torch.get_num_threads() >= (os.cpu_count() or 1):
        print("WARNING: the machine is busy and torch uses every core; OpenMP then waits on "
              "descheduled threads and timings swing wildly. Rerun idle or with --threads 1.")
    res: dict[str, Any] = {
        "host": f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"{os.cpu_count()} CPUs, cuda {torch.cuda.is_available()}",
        "load_avg": round(os.getloadavg()[0], 2), "quick": args.quick,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    run = {"throughput": bench_throughput, "accuracy": bench_accuracy, "eigh": bench_eigh,
           "directions": bench_directions, "memory": bench_memory, "peer": bench_peer,
           "readme": bench_readme}
    res["part_s"] = {}
    for part in (p for p in PARTS + EXTRA_PARTS if p in parts):
        t_part = time.perf_counter()
        print(f"running part {part} ...", flush=True)
        res[part] = run[part](args)
        res["part_s"][part] = round(time.perf_counter() - t_part, 1)
    res["runtime_s"] = round(time.perf_counter() - t0, 1)
    print_report(res)
    out = Path(args.out) if args.out else RESULTS / (
        "bench-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}; total {res['runtime_s']} s")
    return res


if __name__ == "__main__":
    main()
