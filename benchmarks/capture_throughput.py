"""Throughput of nerve_interp's nnsight capture vs a plain forward and vs raw torch hooks.

Run::

    python benchmarks/capture_throughput.py            # defaults: ~5 min on 2 CPU cores
    python benchmarks/capture_throughput.py --quick    # smoke run, well under a minute

Every variant sees the same batches of real text (python-docs corpus) and is timed in the
same process; repetitions are interleaved round-robin over the variants and medians are
reported, so the ratios are measured side by side. Variants:

``plain``
    ``model(**batch)`` under ``torch.no_grad()`` (full model incl. lm head) on a second,
    never-wrapped copy of the model (loaded again from the same weights).
``plain(wrapped)``
    The same on the model that ``collect_spectra`` wrapped with nnsight (wrapping is
    permanent; this shows what it costs outside any trace).
``nnsight f64`` / ``nnsight f32``
    ``collect_spectra(model, batches, points=..., progress=False, gram_dtype=...)``. The final
    eigendecomposition is NOT in these timings: during the timed runs
    ``nerve_interp.capture.finish.spectrum_from_covariance`` is patched with a stub that keeps the
    covariance and skips ``eigvalsh``. Everything else of ``collect_spectra`` (site search,
    batch normalisation, traces, accumulation, ``tracer.stop()``, metadata) is timed. The
    eigendecomposition is timed separately on the real covariances (``spectrum_from_covariance``
    per site) and projected to all sites; ``--end-to-end`` also times one unpatched call.
``raw f64`` / ``raw f32``
    Plain torch hooks on the never-wrapped copy: a forward hook on each FFN's activation module
    reading ``input[0]`` (pre) and a forward pre-hook on the down projection reading
    ``input[0]`` (post), feeding the same ``CovarianceAccumulator`` with the same padding-mask
    row selection; the last hook raises a private exception that ends the forward, as
    ``tracer.stop()`` does. The hooks return None.

Tokens/s counts real (non-padding) tokens; every variant computes the padded batch.
The script then checks that the nnsight and raw-hook captures agree (covariances of all sites,
eigenvalues of ``--check-layers``), so the benchmark cannot silently measure something else.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import torch

import nerve_interp.capture.finish as capture_mod
from nerve_interp.capture import collect_spectra
from nerve_interp.covariance import CovarianceAccumulator
from nerve_interp.data import load_corpus, tokenize_batches
from nerve_interp.sites import as_nnsight, find_ffn_sites, select_sites
from nerve_interp.spectrum import Spectrum, spectrum_from_covariance
from nerve_interp.zoo import load_model


# ------------------------------------------------------------------ helpers
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="nerve_interp.zoo.load_model name")
    p.add_argument("--layers", default="all",
                   help="'all' or comma-separated layer indices (negative from the end)")
    p.add_argument("--points", default="pre,post", help="comma-separated points (pre,post)")
    p.add_argument("--batches", type=int, default=3, help="number of batches")
    p.add_argument("--batch-size", type=int, default=4, help="texts per batch")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (truncation)")
    p.add_argument("--skip-docs", type=int, default=0, help="start at this corpus document")
    p.add_argument("--reps", type=int, default=3,
                   help="interleaved repetitions per variant (order rotated each rep)")
    p.add_argument("--check-layers", default="-1",
                   help="layers (indices into the captured ones) whose eigenvalues are compared "
                        "nnsight vs raw ('all' or list); each site costs 2 eigvalsh per gram "
                        "dtype")
    p.add_argument("--no-wrapped-plain", action="store_true",
                   help="skip the plain forward on the nnsight-wrapped model")
    p.add_argument("--end-to-end", action="store_true",
                   help="also time one unpatched collect_spectra (float64), eigh included")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 batch of 2x32 tokens, 1 rep, layers 0,-1")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.max_length, args.reps = 1, 2, 32, 1
        if args.layers == "all":
            args.layers = "0,-1"
    return args


def parse_layers(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    return [int(t) for t in text.split(",") if t.strip()]


def module_and_io(path: str) -> tuple[str, str]:
    mod, _, io = path.rpartition(".")
    return mod, io


WITHOUT_OUTLIERS = " without outliers"
"""Suffix of :func:`stub_eigh`'s key for a flagged point's covariance without its outliers."""


@contextmanager
def stub_eigh(sink: dict):
    """Patch collect_spectra's eigendecomposition: keep the covariance, skip eigvalsh.

    ``sink[name]`` is the first covariance decomposed under ``name`` (all tokens); a later
    one under the same name (a flagged point's spectrum without its outlier tokens) goes to
    ``sink[name + WITHOUT_OUTLIERS]`` instead of replacing it."""

    def fake(covariance, mean, n_samples, *, eigenvectors=False, name="spectrum", warn=True):
        key = name if name not in sink else name + WITHOUT_OUTLIERS
        sink[key] = (covariance, mean, n_samples)
        d = int(covariance.shape[0])
        return Spectrum(eigenvalues=np.zeros(d), mean=np.zeros(d), n_samples=int(n_samples),
                        name=name)

    with mock.patch.object(capture_mod, "spectrum_from_covariance", fake):
        yield


@contextmanager
def timed_eigh(times: list):
    """Patch collect_spectra's eigendecomposition with a timing wrapper of the real one."""

    def wrapped(*a, **kw):
        t0 = time.perf_counter()
        out = spectrum_from_covariance(*a, **kw)
        times.append(time.perf_counter() - t0)
        return out

    with mock.patch.object(capture_mod, "spectrum_from_covariance", wrapped):
        yield


class _StopForward(Exception):
    """Raised by the last raw hook to end the forward (what tracer.stop() does)."""


def raw_hook_capture(model: torch.nn.Module, batches: list[dict], reads: list[tuple],
                     gram_dtype: torch.dtype | None = None, *, precision: str = "auto"
                     ) -> dict[str, CovarianceAccumulator]:
    """The raw-hook equivalent of collect_spectra's accumulation pass.

    ``reads`` is ``[(name, module_path, io, point)]`` in forward order. Pre points are read in
    a forward hook (``input[0]`` or ``output``), an ``.input`` post point in a forward
    pre-hook (``input[0]``). ``gram_dtype`` / ``precision``: the accumulation mode.
    """
    accs = {name: CovarianceAccumulator(name, gram_dtype=gram_dtype, precision=precision)
            for name, *_ in reads}
    state: dict[str, Any] = {}
    last = reads[-1][0]

    def make(name: str, io: str, pre_hook: bool):
        acc = accs[name]
        stop = name == last

        def take(x: torch.Tensor) -> None:
            idx, shape = state["idx"], state["shape"]
            if tuple(x.shape[:2]) == shape:
                rows = x.reshape(-1, x.shape[-1]).index_select(0, idx)
            else:  # flattened [batch*seq, D] (OPT)
                rows = x.index_select(0, idx)
            acc.update(rows)
            if stop:
                raise _StopForward

        if pre_hook:
            def hook(module, args):  # forward pre-hook: returns None
                take(args[0])
        elif io == "input":
            def hook(module, args, output):  # forward hook: returns None
                take(args[0])
        else:
            def hook(module, args, output):  # forward hook: returns None
                take(output)
        return hook

    handles = []
    try:
        for name, mod_path, io, point in reads:
            module = model.get_submodule(mod_path)
            if point != "pre" and io == "input":
                handles.append(module.register_forward_pre_hook(make(name, io, True)))
            else:
                handles.append(module.register_forward_hook(make(name, io, False)))
        with torch.no_grad():
            for batch in batches:
                keep = batch["attention_mask"].bool()
                state["idx"] = keep.reshape(-1).nonzero().squeeze(1)
                state["shape"] = tuple(keep.shape)
                try:
                    model(**batch)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the last raw hook never fired; the forward ran to the end")
    finally:
        for h in handles:
            h.remove()
    for acc in accs.values():  # collect_spectra forms every covariance before eigh: so do we
        _ = acc.covariance_
    return accs


def plain_forward(model: torch.nn.Module, batches: list[dict]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(**batch)


def rel_diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """max |a - b| / max |a| (scale-relative, so tiny tail eigenvalues do not blow it up)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / scale if scale else float((a - b).abs().max())


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*rank-deficient.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    layers = parse_layers(args.layers)

    # Two copies of the same weights: one goes through nnsight, one never does.
    model, tok = load_model(args.model)
    ref_model, _ = load_model(args.model)
    wrapper = as_nnsight(model)
    sites = select_sites(find_ffn_sites(wrapper), layers)
    reads = []
    for s in sites:
        for p in (q for q in ("pre", "act", "up", "post") if q in points):
            mod_path, io = module_and_io(s.path(p))
            reads.append((s.name(p), mod_path, io, p))

    docs = load_corpus("python-docs", seed=None)  # the workload of earlier runs (timings only)
    n_docs = args.batches * args.batch_size
    texts = docs[args.skip_docs:args.skip_docs + n_docs]
    batches = list(tokenize_batches(texts, tok, batch_size=args.batch_size,
                                    max_length=args.max_length))
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    n_padded = sum(b["input_ids"].numel() for b in batches)

    print(f"model {args.model} ({type(model).__name__}, {sites[0].family} family), "
          f"{len(sites)} layers x points {','.join(points)} = {len(reads)} sites")
    print(f"data: {len(batches)} batches of {args.batch_size} python-docs texts, max_length "
          f"{args.max_length}: {n_real} real tokens ({n_padded} incl. padding)")
    load0 = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load avg at start {load0:.2f}; reps {args.reps} (round-robin)")
    if load0 >= 0.8 and torch.get_num_threads() >= (os.cpu_count() or 1):
        print("WARNING: the 1-min load average is high (it lags: a run just before counts). "
              "If other processes use the CPUs while torch uses every core, OpenMP waits on "
              "descheduled threads (measured 35x slower forwards on 2 cores with one busy); "
              "rerun on an idle machine or with --threads 1.")

    # Variants. Each returns what the correctness check needs (or None).
    cov_sinks: dict[str, dict] = {}
    raw_accs: dict[str, dict] = {}

    def run_nnsight(key: str, dtype: torch.dtype) -> None:
        sink: dict = {}
        with stub_eigh(sink):
            collect_spectra(model, batches, layers=layers, points=points, progress=False,
                            gram_dtype=dtype)
        cov_sinks[key] = sink

    def run_raw(key: str, dtype: torch.dtype) -> None:
        raw_accs[key] = raw_hook_capture(ref_model, batches, reads, dtype)

    variants: dict[str, Any] = {
        "plain": lambda: plain_forward(ref_model, batches),
        "nnsight f64": lambda: run_nnsight("f64", torch.float64),
        "raw f64": lambda: run_raw("f64", torch.float64),
        "nnsight f32": lambda: run_nnsight("f32", torch.float32),
        "raw f32": lambda: run_raw("f32", torch.float32),
    }
    if not args.no_wrapped_plain:
        variants["plain(wrapped)"] = lambda: plain_forward(model, batches)

    # Warm-up on one batch (first-call allocations and kernels of both gram dtypes, nnsight's
    # first trace), untimed.
    warm = batches[:1]
    plain_forward(ref_model, warm)
    plain_forward(model, warm)
    for dtype in (torch.float64, torch.float32):
        with stub_eigh({}):
            collect_spectra(model, warm, layers=layers, points=points, progress=False,
                            gram_dtype=dtype)
        raw_hook_capture(ref_model, warm, reads, dtype)

    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.reps):
        cov_sinks.clear()  # free the last rep's statistics before timing the next (untimed)
        raw_accs.clear()
        names = list(variants)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed order effects
        for name in names:
            fn = variants[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"  rep {r + 1}/{args.reps}: "
              + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names), flush=True)

    # Correctness: nnsight vs raw hooks, same statistics?
    check_layers = parse_layers(args.check_layers)
    check_names = {s.name(p) for s in select_sites(sites, check_layers) for p in points}
    eigh_times: list[float] = []
    print("\ncheck nnsight vs raw hooks (max |a-b| / max |a|):")
    eig_cache: dict[tuple[str, str], np.ndarray] = {}
    for key in ("f64", "f32"):
        accs = raw_accs[key]  # raw hooks keep no spectra without outliers: all tokens only
        sink = {n: v for n, v in cov_sinks[key].items() if not n.endswith(WITHOUT_OUTLIERS)}
        assert set(sink) == set(accs), "nnsight and raw hooks captured different sites"
        cov_d = max(rel_diff(sink[n][0], accs[n].covariance_) for n in sink)
        mean_d = max(rel_diff(sink[n][1], accs[n].mean_) for n in sink)
        n_ok = all(sink[n][2] == accs[n].n_samples_seen_ for n in sink)
        eig_d = 0.0
        for n in sorted(check_names):
            cov, mean, count = sink[n]
            t0 = time.perf_counter()
            ev_nn = spectrum_from_covariance(cov, mean, count, name=n, warn=False).eigenvalues
            eigh_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ev_raw = spectrum_from_covariance(accs[n].covariance_, accs[n].mean_, count,
                                              name=n, warn=False).eigenvalues
            eigh_times.append(time.perf_counter() - t0)
            eig_d = max(eig_d, rel_diff(ev_nn, ev_raw))
            eig_cache[(key, n)] = ev_nn
        print(f"  gram {key}: covariance {cov_d:.2e}, mean {mean_d:.2e} over {len(sink)} sites; "
              f"eigenvalues {eig_d:.2e} over {len(check_names)} sites; token counts "
              f"{'equal' if n_ok else 'DIFFER'} ({next(iter(sink.values()))[2]} per site)")
    f_d = max(rel_diff(eig_cache[("f64", n)], eig_cache[("f32", n)]) for n in check_names)
    print(f"  (for scale: gram f32 vs f64 eigenvalues differ by {f_d:.2e})")

    eigh_one = statistics.median(eigh_times)
    eigh_all = eigh_one * len(reads)

    # Table.
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n_real / v for k, v in med.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"\n{'variant':<26}{'median s':>10}{'min s':>8}{'tokens/s':>11}{'x plain':>9}"
          f"{'nnsight/raw':>13}")
    order = ["plain", "plain(wrapped)", "raw f64", "nnsight f64", "raw f32", "nnsight f32"]
    for k in (k for k in order if k in times):
        nr = ""
        if k.startswith("nnsight"):
            nr = f"{paired(k, 'raw ' + k.split()[1]):.3f}"
        print(f"{k:<26}{med[k]:>10.2f}{min(times[k]):>8.2f}{fmt_rate(rate[k]):>11}"
              f"{paired(k, 'plain'):>9.2f}{nr:>13}")
    for key in ("f64", "f32"):
        k = f"nnsight {key}"
        total = med[k] + eigh_all
        print(f"{k + ' + eigh (proj.)':<26}{total:>10.2f}{'':>8}{fmt_rate(n_real / total):>11}"
              f"{total / med['plain']:>9.2f}{'':>13}")
    print(f"\nx plain = median over reps of (variant time / plain time in the same rep); "
          f"nnsight/raw likewise, same gram dtype;\n"
          f"'+ eigh (proj.)' rows: (median + projected eigh) / median plain.\n"
          f"eigh: spectrum_from_covariance "
          f"(float64 eigvalsh, D={next(iter(cov_sinks['f64'].values()))[0].shape[0]}) median "
          f"{eigh_one:.2f} s over {len(eigh_times)} calls; x {len(reads)} sites = "
          f"{eigh_all:.1f} s projected, a fixed cost per capture (independent of tokens).")
    print("nnsight rows time collect_spectra with its eigendecomposition stubbed out "
          "(accumulation pass + setup).")

    if args.end_to_end:
        e_times: list[float] = []
        t0 = time.perf_counter()
        with timed_eigh(e_times):
            collect_spectra(model, batches, layers=layers, points=points, progress=False)
        total = time.perf_counter() - t0
        print(f"end-to-end collect_spectra f64 (unpatched): {total:.2f} s, of which "
              f"spectrum_from_covariance {sum(e_times):.2f} s ({len(e_times)} calls).")

    print(f"\nload avg at end {os.getloadavg()[0]:.2f}; total runtime "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
