r"""What an eigen-direction means: contexts, token summaries and a vocabulary readout.

:func:`explain_directions` reads one FFN point over a text in one streaming nnsight pass and
projects every real token onto a few directions ``u_i`` of that point's spectrum,
``s_i = u_iᵀ(x − μ)`` (``μ`` the spectrum's mean). It keeps, in memory that does not grow with
the text (:mod:`nerve_interp.direction_stats`):

* the ``k_examples`` tokens of largest and of smallest projection, with a context window;
* per token type, the count and mean projection (the most extreme types);
* the share of each direction's second moment held by frequent / middle / rare token types;

and, for the ``post`` point of a decoder LM, reads each direction through the unembedding
(:mod:`nerve_interp.readout`). The result is a :class:`~nerve_interp.direction_report.
DirectionReport` of tidy frames with an HTML card per direction.

Which directions (``directions=``)
----------------------------------
* ``"top:k"``: the ``k`` largest eigenvalues;
* ``"tail:k"``: the ``k`` smallest eigenvalues *with variance* (``λ > 1e-12·λ_1``), as
  ``tail`` means in ablations (:func:`nerve_interp.projection.subspace_indices`);
* ``"reinjected:k"``: post directions that carry the most variance *outside* the dominant pre
  subspace. Let ``U_pre,r`` be the top ``r`` pre eigenvectors, ``r`` the fewest that hold
  ``reinjected_energy`` (default 90%) of the pre variance. Pre and post live in the same
  coordinates (one neuron per dimension; the nonlinearity acts neuron by neuron), so each post
  eigenvector ``u_i`` has a share ``c_i = ‖U_pre,rᵀ u_i‖² ∈ [0, 1]`` inside that subspace. The
  reinjected variance of ``u_i`` is ``ρ_i = λ_i^post (1 − c_i)``, the post variance along
  ``u_i`` that the dominant pre directions do not span, and ``"reinjected:k"`` takes the ``k``
  largest ``ρ_i``. Needs both points of the layer with eigenvectors;
* a sequence of eigen-indices (0 = largest eigenvalue);
* an array ``[D, d]`` of directions (columns, normalised here), e.g. a random control;
* several of these at once: ``"top:8,tail:8,reinjected:8"`` or a list such as
  ``["top:8", random_basis]``, concatenated in order, each direction keeping its kind.

The sign of an eigenvector is arbitrary; each direction is signed so that its largest
``|projection|`` on this text is positive (the ``sign`` column records the flip, and the
readout uses the signed direction): the ``top`` examples are the heavier side.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .capture.backends import check_alignment
from .capture.collect import input_device, vocab_size
from .capture.run import to_device
from .capture.selection import Tally, TokenSelector
from .capture.source import Batch, batches
from .diagnostics import exclusion_rule
from .direction_stats import ExtremeHeap, TokenProjectionStats
from .errors import CaptureError, SiteError
from .projection import effective_rank_count, energy_k, subspace_indices
from .sites import FFNSite, as_nnsight, find_ffn_sites, site_name

_SPEC = re.compile(r"^(top|tail|reinjected):(\d+)$")
KINDS = ("top", "tail", "reinjected", "index", "custom")


@dataclasses.dataclass(frozen=True)
class DirectionSet:
    """The chosen directions of one point.

    Attributes
    ----------
    basis : array of shape (D, d)
        Unit directions as columns.
    index : array of shape (d,)
        Eigen-index of each (descending order), -1 for custom directions.
    kind : array of str of shape (d,)
        ``top``, ``tail``, ``reinjected``, ``index`` or ``custom``, per direction.
    variance : array of shape (d,)
        ``uᵀΣu``: the eigenvalue of an eigen-direction.
    variance_share : array of shape (d,)
        ``uᵀΣu / tr Σ``.
    reinjected : array of shape (d,)
        ``ρ_i`` of the module docstring (NaN unless ``kind == "reinjected"``).
    """

    basis: np.ndarray
    index: np.ndarray
    kind: np.ndarray
    variance: np.ndarray
    variance_share: np.ndarray
    reinjected: np.ndarray


def _bad_spec(spec: Any, d: int) -> ValueError:
    return ValueError(
        f"directions={spec!r} is not a direction spec. Use 'top:k', 'tail:k' or "
        f"'reinjected:k' (k >= 1), a list of eigen-indices in [0, {d}), or an array "
        f"[{d}, d] of directions.")


def check_spec_text(text: str) -> str:
    """``text`` if it is a well-formed comma-separated spec (``"top:8,tail:8"``, ``"0,3,7"``)
    before any spectra exist (the CLI checks it before loading the model); a ``ValueError``
    quoting the bad part otherwise. Ranges against D are checked later, with the spectra."""
    parts = [p.strip() for p in str(text).split(",")]
    bad = [p for p in parts if not (_SPEC.match(p) and int(p.split(":")[1]) >= 1)
           and not p.isdigit()]
    if not parts or bad:
        raise ValueError(f"--directions {text!r}: {bad or text!r} is not a direction spec. "
                         "Use top:k, tail:k or reinjected:k (k >= 1), eigen-indices such as "
                         "0,3,7, or several of these comma-separated (top:8,tail:8).")
    return text


def reinjection_scores(spectra: Any, layer: int, energy: float = 0.9) -> np.ndarray:
    """``ρ_i = λ_i^post (1 − ‖U_pre,rᵀ u_i‖²)`` for every post direction, shape (D,).

    See the module docstring; ``r`` is the fewest pre directions holding ``energy`` of the
    pre variance.
    """
    lam_pre = spectra.eigenvalues(layer, "pre")
    u_pre = spectra.eigenvectors(layer, "pre")
    u_post = spectra.eigenvectors(layer, "post")
    if u_pre.shape[0] != u_post.shape[0]:
        raise ValueError(
            f"reinjected directions need pre and post of the same width; layer {layer} has "
            f"pre D={u_pre.shape[0]} and post D={u_post.shape[0]}.")
    r = energy_k(lam_pre, energy)
    inside = np.sum((u_pre[:, :r].T @ u_post) ** 2, axis=0)
    return spectra.eigenvalues(layer, "post") * np.clip(1.0 - inside, 0.0, 1.0)


def select_directions(spectra: Any, layer: int, point: str, directions: Any, *,
                      reinjected_energy: float = 0.9) -> DirectionSet:
    """Resolve ``directions`` (module docstring) for ``spectra``'s ``(layer, point)``.

    Several specs combine: ``"top:8,tail:8,reinjected:8"`` or a list of specs, indices and
    arrays; the directions are concatenated in that order, each keeping its own kind.

    Raises
    ------
    NotFittedError
        The spectra were collected without eigenvectors.
    SiteError
        The layer or point was not captured.
    ValueError
        A spec that does not parse, or a ``k`` / index out of range.

    Examples
    --------
    >>> select_directions(spectra, 3, "post", "top:2,tail:1").kind  # doctest: +SKIP
    array(['top', 'top', 'tail'], dtype='<U4')
    """
    if isinstance(directions, str) and "," in directions:
        parts: list[Any] = [p.strip() for p in directions.split(",") if p.strip()]
        parts = [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    elif isinstance(directions, (list, tuple)) and any(
            isinstance(p, (str, np.ndarray)) for p in directions):
        parts = list(directions)
    else:
        return _one_spec(spectra, layer, point, directions, reinjected_energy)
    if not parts:
        raise _bad_spec(directions, spectra.eigenvalues(layer, point).size)
    sets = [_one_spec(spectra, layer, point, [p] if isinstance(p, (int, np.integer)) else p,
                      reinjected_energy) for p in parts]
    return DirectionSet(*(np.concatenate([getattr(s, f.name) for s in sets],
                                         axis=1 if f.name == "basis" else 0)
                          for f in dataclasses.fields(DirectionSet)))


def _one_spec(spectra: Any, layer: int, point: str, directions: Any, energy: float
              ) -> DirectionSet:
    lam = spectra.eigenvalues(layer, point)
    vecs = spectra.eigenvectors(layer, point)
    d = lam.size
    rho = np.full(d, np.nan)
    if isinstance(directions, str):
        m = _SPEC.match(directions.strip())
        if m is None or int(m.group(2)) < 1:
            raise _bad_spec(directions, d)
        kind, k = m.group(1), int(m.group(2))
        where = f" ({site_name(layer, point)}, D = {d})"
        if kind == "reinjected":
            if point != "post":
                raise ValueError(f"directions={directions!r} needs point='post' (reinjected "
                                 f"directions are post directions); got point={point!r}.")
            rho = reinjection_scores(spectra, layer, energy)
            if k > effective_rank_count(lam):
                raise ValueError(f"k == {k}, more than the {effective_rank_count(lam)} "
                                 f"directions with variance{where}.")
            idx = np.argsort(-rho, kind="stable")[:k]
        else:
            idx = subspace_indices(lam, kind, k, context=where)
        return _eigen_set(lam, vecs, idx, kind, rho)
    arr = np.asarray(directions)
    if arr.ndim == 2 and arr.dtype.kind == "f":
        return _custom_set(lam, vecs, arr)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise _bad_spec(directions, d)
    if arr.min() < 0 or arr.max() >= d:
        raise ValueError(f"eigen-index {int(arr.max() if arr.max() >= d else arr.min())} out "
                         f"of range [0, {d}) ({site_name(layer, point)}).")
    return _eigen_set(lam, vecs, arr.astype(int), "index", rho)


def _eigen_set(lam: np.ndarray, vecs: np.ndarray, idx: np.ndarray, kind: str,
               rho: np.ndarray) -> DirectionSet:
    idx = np.asarray(idx)
    return DirectionSet(vecs[:, idx], idx, np.full(idx.size, kind), lam[idx],
                        lam[idx] / lam.sum(), rho[idx])


def _custom_set(lam: np.ndarray, vecs: np.ndarray, arr: np.ndarray) -> DirectionSet:
    if arr.shape[0] != lam.size:
        raise ValueError(f"directions has shape {arr.shape}; an array of directions must be "
                         f"[D, d] with D = {lam.size} (the point's width), one per column.")
    norms = np.linalg.norm(arr, axis=0)
    if not np.all(norms > 0):
        raise ValueError("directions has a zero column; every direction needs a length.")
    basis = arr / norms
    var = (lam[:, None] * (vecs.T @ basis) ** 2).sum(0)
    d = basis.shape[1]
    return DirectionSet(basis, np.full(d, -1), np.full(d, "custom"), var, var / lam.sum(),
                        np.full(d, np.nan))


# ------------------------------------------------------------------ the pass
class DirectionStats:
    """Everything the pass keeps: two heaps, the per-type sums, and the token count.

    Parameters
    ----------
    basis : float64 tensor of shape (D, d)
    mean : float64 tensor of shape (D,)
    k : int
        Examples per side.
    before, after : int
        Context tokens kept before and after each example.
    vocab : int
        Vocabulary size (token ids).
    """

    def __init__(self, basis: torch.Tensor, mean: torch.Tensor, k: int, before: int,
                 after: int, vocab: int) -> None:
        d = basis.shape[1]
        self.basis, self.mean, self.before, self.after = basis, mean, before, after
        w = before + after + 1
        self.top = ExtremeHeap(k, d, w, largest=True)
        self.bottom = ExtremeHeap(k, d, w, largest=False)
        self.types = TokenProjectionStats(vocab, d)
        self.n_tokens = 0

    def update(self, x: torch.Tensor, batch: Batch, rows: torch.Tensor, name: str) -> None:
        """Project the activations ``x`` ``[batch, seq, D]`` and fold the kept flat ``rows``
        in."""
        if x.shape[-1] != self.basis.shape[0]:
            raise CaptureError(
                f"{name}: the model's activations have width {x.shape[-1]} but the spectra's "
                f"directions have D = {self.basis.shape[0]}; pass the spectra of this model.")
        basis = self.basis.to(x.device)
        scores = (x.detach().to(torch.float64) - self.mean.to(x.device)) @ basis  # [B, S, d]
        if not bool(torch.isfinite(scores).all()):
            raise CaptureError(f"{name}: NaN/inf activations ({batch.describe()}).")
        scores = scores.cpu()
        flat = scores.reshape(-1, scores.shape[-1])[rows]
        ids = batch.ids.reshape(-1)[rows]
        ctx = _Context(batch, scores, rows, self.before, self.after)
        self.top.update(flat, ctx)
        self.bottom.update(flat, ctx)
        self.types.update(ids, flat)
        self.n_tokens += int(rows.numel())


class _Context:
    """Context windows of the kept rows of one batch (called with candidate row numbers)."""

    def __init__(self, batch: Batch, scores: torch.Tensor, rows: torch.Tensor, before: int,
                 after: int) -> None:
        self.ids, self.real = batch.ids.cpu(), batch.real.cpu()
        self.scores, self.rows, self.first = scores, rows, batch.first_sequence
        self.offsets = torch.arange(-before, after + 1)

    def __call__(self, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seq_len = self.ids.shape[1]
        flat = self.rows[cand]
        b, s = flat // seq_len, flat % seq_len
        cols = s[:, None] + self.offsets[None, :]  # [m, W]
        inside = (cols >= 0) & (cols < seq_len)
        c = cols.clamp(0, seq_len - 1)
        ok = inside & self.real[b[:, None], c]
        ids = torch.where(ok, self.ids[b[:, None], c], torch.full_like(c, -1))
        proj = self.scores[b[:, None], c] * ok[..., None]  # [m, W, d]
        pos = (self.real.long().cumsum(1) - 1)[b, s]
        meta = torch.stack([b + self.first, pos, self.ids[b, s]], 1)
        return ids, proj, meta


@dataclasses.dataclass(frozen=True)
class DirectionOptions:
    """The less common keywords of :func:`explain_directions`, checked once.

    Parameters
    ----------
    k_examples : int >= 1, default 20
        Examples kept per direction and side (largest and smallest projections).
    context : (int, int), default (12, 4)
        Tokens shown before and after each example.
    max_tokens : int >= 1 or None, default 20_000
        Real tokens read (None: the whole text).
    batch_size, max_length : int >= 1, default 8 and 256
        Tokenisation of strings, as in ``collect_spectra``.
    exclude_positions : tuple of int, default ()
        Positions (among the real tokens of each sequence) left out, e.g. ``(0,)``.
    n_tokens : int >= 1, default 10
        Token types listed per direction and side (mean projection), and readout tokens.
    min_count : int >= 1, default 3
        Occurrences a token type needs before its mean projection is listed.
    reinjected_energy : float in (0, 1], default 0.9
        Share of the pre variance held by the pre subspace of ``"reinjected:k"``.
    """

    k_examples: int = 20
    context: tuple[int, int] = (12, 4)
    max_tokens: int | None = 20_000
    batch_size: int = 8
    max_length: int = 256
    exclude_positions: tuple[int, ...] = ()
    n_tokens: int = 10
    min_count: int = 3
    reinjected_energy: float = 0.9

    def __post_init__(self) -> None:
        c = self.context
        if not (isinstance(c, Sequence) and len(c) == 2):
            raise ValueError(f"context == {c!r}, must be (before, after), e.g. (12, 4).")
        for value in c:
            _check_int(value, "context", 0)
        for name in ("k_examples", "batch_size", "max_length", "n_tokens", "min_count"):
            _check_int(getattr(self, name), name, 1)
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", 1)
        if not 0 < float(self.reinjected_energy) <= 1:
            raise ValueError(f"reinjected_energy == {self.reinjected_energy!r}, must be in "
                             "(0, 1] (a share of the pre variance).")
        object.__setattr__(self, "context", (int(c[0]), int(c[1])))
        object.__setattr__(self, "exclude_positions",
                           tuple(int(p) for p in self.exclude_positions))

    @property
    def before(self) -> int:
        return self.context[0]

    @property
    def after(self) -> int:
        return self.context[1]


def run_pass(wrapper: Any, site: FFNSite, point: str, texts: Any, tokenizer: Any,
             stats: DirectionStats, opts: DirectionOptions) -> DirectionStats:
    """One nnsight pass over ``texts``: read ``point`` of ``site``, fold every kept token into
    ``stats`` inside the trace, stop after the point."""
    root = wrapper._module
    device = input_device(root)
    rule = exclusion_rule(opts.exclude_positions, max_length=opts.max_length)
    selector = TokenSelector(rule, None, 0, device, with_meta=False)
    tally, path, name = Tally(), site.path(point), site.name(point)
    for batch in batches(texts, tokenizer, batch_size=opts.batch_size,
                         max_length=opts.max_length):
        remaining = None if opts.max_tokens is None else opts.max_tokens - stats.n_tokens
        if remaining is not None and remaining <= 0:
            break
        if batch.ids is None:
            raise CaptureError("explain_directions needs token inputs (texts with a "
                               "tokenizer, or input_ids batches).")
        sel = selector.select(batch, remaining, tally)
        if sel is None:
            continue
        inputs = {k: to_device(v, device) for k, v in batch.inputs.items()}
        with torch.no_grad(), wrapper.trace(**inputs) as tracer:
            x = wrapper.get(path)
            check_alignment(tuple(x.shape), sel.mask_shape, name)
            stats.update(x.reshape(*sel.mask_shape, x.shape[-1]), batch, sel.idx.cpu(), name)
            tracer.stop()
    if stats.n_tokens == 0:
        raise CaptureError("no tokens reached the pass: the texts were empty or every token "
                           "was excluded. Pass non-empty texts.")
    return stats


def _site(wrapper: Any, spectra: Any, layer: int, point: str) -> tuple[FFNSite, int]:
    sites = find_ffn_sites(wrapper)
    n = len(sites)
    if not -n <= int(layer) < n:
        raise SiteError(f"layer {layer} out of range: the model has {n} FFN layers "
                        f"(0..{n - 1}, or -{n}..-1 from the end).")
    site = sites[int(layer) % n]
    if point not in site.points:
        site.path(point)  # raises the SiteError listing the points
    spectra.spectrum(site.layer, point)  # SiteError when the spectra lack it
    return site, site.layer


def explain_directions(
    model: Any,
    spectra: Any,
    texts: Any,
    *,
    tokenizer: Any = None,
    layer: int,
    point: str = "post",
    directions: Any = "top:16",
    k_examples: int = 20,
    max_tokens: int | None = 20_000,
    options: DirectionOptions | None = None,
) -> Any:
    """Contexts, token summaries and vocabulary readout of eigen-directions of one FFN point.

    Parameters
    ----------
    model : torch.nn.Module or nnsight wrapper
        The model the spectra came from.
    spectra : SpectraResult
        Collected with ``eigenvectors=True`` (and with ``pre`` too for ``"reinjected:k"``).
    texts : list of str or batches
        The text to read (as for ``collect_spectra``); a held-out text is the cleaner choice.
    tokenizer : optional
        Needed for strings, and to show tokens (ids are shown as ``#id`` without one).
    layer : int
        The layer (negative counts from the end).
    point : str, default "post"
    directions : str, sequence of int or array of shape (D, d), default "top:16"
        ``"top:k"``, ``"tail:k"``, ``"reinjected:k"``, eigen-indices or directions; see the
        module docstring for the exact definitions.
    k_examples : int, default 20
        Examples kept per direction and side (largest and smallest projections).
    max_tokens : int or None, default 20_000
        Real tokens read (None: the whole text).
    options : DirectionOptions, optional
        Context window, tokenisation, excluded positions, list lengths (its ``k_examples``
        and ``max_tokens`` are replaced by the keywords above).

    Returns
    -------
    DirectionReport
        ``.directions``, ``.examples``, ``.tokens``, ``.readout``, ``.buckets``; ``.show()``,
        ``.save(dir)``.

    Raises
    ------
    NotFittedError
        Spectra without eigenvectors.
    SiteError
        A layer out of range or not captured, or a point the FFN does not have.
    ValueError
        A direction spec that does not parse or is out of range; bad sizes.
    CaptureError
        No tokens, NaN/inf activations, or spectra of another width.

    Examples
    --------
    >>> model, tok = ni.load_model("smollm2-135m")  # doctest: +SKIP
    >>> spectra = ni.collect_spectra(model, texts, tokenizer=tok, layers=[15],
    ...                              eigenvectors=True, max_tokens=20_000)  # doctest: +SKIP
    >>> report = ni.explain_directions(model, spectra, held_out, tokenizer=tok, layer=15,
    ...                                directions="top:8")  # doctest: +SKIP
    >>> report.examples.columns.tolist()[:4]  # doctest: +SKIP
    ['direction', 'index', 'side', 'rank']
    """
    from .direction_report import build_report

    opts = dataclasses.replace(options or DirectionOptions(), k_examples=k_examples,
                               max_tokens=max_tokens)
    wrapper = as_nnsight(model)
    site, layer = _site(wrapper, spectra, layer, point)
    chosen = select_directions(spectra, layer, point, directions,
                               reinjected_energy=opts.reinjected_energy)
    vocab = vocab_size(wrapper._module, tokenizer)
    stats = DirectionStats(torch.as_tensor(chosen.basis, dtype=torch.float64),
                           torch.as_tensor(spectra.mean(layer, point), dtype=torch.float64),
                           opts.k_examples, opts.before, opts.after, vocab)
    run_pass(wrapper, site, point, texts, tokenizer, stats, opts)
    return build_report(wrapper._module, site, point, chosen, stats, tokenizer, spectra,
                        directions_spec=directions, opts=opts)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} == {value!r}, must be an int >= {minimum}.")
    return int(value)


__all__ = ["DirectionOptions", "DirectionSet", "DirectionStats", "explain_directions",
           "reinjection_scores", "run_pass", "select_directions"]
