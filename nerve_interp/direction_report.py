"""``DirectionReport``: the tidy frames of :func:`~nerve_interp.directions.explain_directions`,
an HTML card per direction, and save / load.

Frames (one row per item, every frame keyed by ``direction``, the direction's position in the
report, and ``index``, its eigen-index, -1 for custom directions):

* ``directions``: kind, eigenvalue (``uᵀΣu``), variance share, reinjected variance, sign,
  mean / std of the projection on the text, ``top_token_share`` (the share of the top
  examples that are the most common token among them: 1 when one token type owns the top);
* ``examples``: side (``top`` / ``bottom``), rank, projection, document, position, token and
  its context (``context``: tokens, ``context_projection``: their projections, ``center``:
  the example's place in the window);
* ``tokens``: side (``high`` / ``low``), rank, token, mean projection and count;
* ``readout``: side (``promoted`` / ``suppressed``), rank, token, logit per unit projection;
* ``buckets``: frequency bucket, its types, tokens, token share and variance share.

``save(dir)`` writes each frame as CSV (list columns as JSON), ``metadata.json`` and one
self-contained ``report.html`` (inline CSS, no scripts, no network assets).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from .direction_stats import frequency_buckets
from .readout import ReadoutWeights, readout_weights, top_tokens

FRAMES = ("directions", "examples", "tokens", "readout", "buckets")
_LIST_COLUMNS = ("context", "context_projection")


class DirectionReport:
    """What the directions of one FFN point respond to and promote (see module docstring).

    Attributes
    ----------
    directions, examples, tokens, readout, buckets : pandas.DataFrame
    metadata : dict
        Model, layer, point, site, direction spec, tokens read, readout note or matrices.
    """

    def __init__(self, frames: dict[str, pd.DataFrame], metadata: dict[str, Any]) -> None:
        missing = [f for f in FRAMES if f not in frames]
        if missing:
            raise KeyError(f"DirectionReport needs the frames {list(FRAMES)}; missing {missing}.")
        for name in FRAMES:
            setattr(self, name, frames[name])
        self.metadata = dict(metadata)

    def card_html(self, direction: int) -> str:
        """The HTML card of one direction (its position in the report), with its style."""
        return f"<div class='ni-report'><style>{_CSS}</style>{_card(self, int(direction))}</div>"

    def to_html(self, *, page: bool = False) -> str:
        """Every card; ``page=True`` wraps them in a full, self-contained HTML page."""
        body = _header(self) + "".join(_card(self, int(d)) for d in self.directions.direction)
        if not page:
            return f"<div class='ni-report'><style>{_CSS}</style>{body}</div>"
        title = html.escape(f"{self.metadata.get('model', '')} {self.metadata.get('site', '')}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
                f"<style>{_CSS}</style></head><body class='ni-report'>{body}</body></html>")

    def _repr_html_(self) -> str:
        return self.to_html()

    def show(self) -> Any:
        """Display the cards in Jupyter (returns an ``IPython.display.HTML``)."""
        from IPython.display import HTML, display

        out = HTML(self.to_html())
        display(out)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the frames (CSV), ``metadata.json`` and ``report.html`` into directory
        ``path`` (created); returns it."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for name in FRAMES:
            df = getattr(self, name).copy()
            for col in _LIST_COLUMNS:
                if col in df:
                    df[col] = [json.dumps(list(v)) for v in df[col]]
            df.to_csv(out / f"{name}.csv", index=False)
        (out / "metadata.json").write_text(json.dumps(self.metadata, indent=1, default=str))
        (out / "report.html").write_text(self.to_html(page=True), encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> DirectionReport:
        """Read a directory written by :meth:`save`."""
        src = Path(path)
        if not (src / "metadata.json").exists():
            raise FileNotFoundError(f"{src} has no metadata.json; pass a directory written "
                                    "by DirectionReport.save().")
        frames = {}
        for name in FRAMES:
            df = pd.read_csv(src / f"{name}.csv", keep_default_na=False, na_values=[""])
            if "token" in df:  # a token that decodes to "" is not missing
                df["token"] = df["token"].fillna("").astype(str)
            for col in _LIST_COLUMNS:
                if col in df:
                    df[col] = [json.loads(v) for v in df[col]]
            frames[name] = df
        return cls(frames, json.loads((src / "metadata.json").read_text()))

    def __repr__(self) -> str:
        m = self.metadata
        return (f"DirectionReport({m.get('model')!r}, {m.get('site')}, "
                f"{len(self.directions)} directions, {m.get('n_tokens')} tokens)")


# ------------------------------------------------------------------ building
class _Decoder:
    """Token id -> display string, cached (``#id`` without a tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        i = int(i)
        if i not in self.cache:
            self.cache[i] = f"#{i}" if self.tok is None else self.tok.decode([i])
        return self.cache[i]


def _signs(stats: Any) -> np.ndarray:
    """+1 where the largest |projection| is positive, else -1 (per direction)."""
    top = stats.top.values[:, 0].numpy()
    bottom = stats.bottom.values[:, 0].numpy()
    return np.where(top >= -bottom, 1.0, -1.0)


def _heap_rows(heap: Any, sign: np.ndarray, side: str, decode: Callable, index: np.ndarray,
               center: int) -> list[dict]:
    """Rows of ``examples`` from one heap, values multiplied by ``sign`` per direction
    (``center``: the example's index in a full window)."""
    rows = []
    for j in range(heap.d):
        for r in range(heap.k):
            value = float(heap.values[j, r])
            if not np.isfinite(value):
                continue
            ids, proj = heap.ids[j, r].numpy(), heap.proj[j, r].numpy()
            ok = ids >= 0
            doc, pos, tid = (int(v) for v in heap.meta[j, r])
            rows.append({
                "direction": j, "index": int(index[j]), "side": side, "rank": r,
                "projection": sign[j] * value, "document": doc, "position": pos,
                "token_id": tid, "token": decode(tid),
                "context": [decode(t) for t in ids[ok]],
                "context_projection": [float(sign[j] * p) for p in proj[ok]],
                "center": int(ok[:center].sum())})
    return rows


def _examples(stats: Any, sign: np.ndarray, decode: Callable, index: np.ndarray
              ) -> pd.DataFrame:
    """Top and bottom examples after the sign flip (flipped directions swap sides)."""
    rows = []
    for heap, side in ((stats.top, "top"), (stats.bottom, "bottom")):
        for row in _heap_rows(heap, sign, side, decode, index, stats.before):
            if sign[row["direction"]] < 0:
                row["side"] = "bottom" if side == "top" else "top"
            rows.append(row)
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby(["direction", "side"])["projection"].rank(
        ascending=False, method="first").astype(int) - 1
    df.loc[df.side == "bottom", "rank"] = df[df.side == "bottom"].groupby("direction")[
        "projection"].rank(ascending=True, method="first").astype(int) - 1
    return df.sort_values(["direction", "side", "rank"], ascending=[True, False, True],
                          ignore_index=True)


def _tokens(stats: Any, sign: np.ndarray, decode: Callable, index: np.ndarray, n: int,
            min_count: int) -> pd.DataFrame:
    means = stats.types.means(min_count) * sign[None, :]
    counts = stats.types.counts.numpy()
    rows = []
    for j in range(means.shape[1]):
        col = means[:, j]
        valid = np.flatnonzero(~np.isnan(col))
        order = valid[np.argsort(-col[valid], kind="stable")]
        for side, ids in (("high", order[:n]), ("low", order[::-1][:n])):
            rows += [{"direction": j, "index": int(index[j]), "side": side, "rank": r,
                      "token_id": int(t), "token": decode(t), "mean_projection": float(col[t]),
                      "count": int(counts[t])} for r, t in enumerate(ids)]
    return pd.DataFrame(rows, columns=["direction", "index", "side", "rank", "token_id",
                                       "token", "mean_projection", "count"])


def _readout(weights: ReadoutWeights | str, basis: np.ndarray, decode: Callable,
             index: np.ndarray, n: int) -> pd.DataFrame:
    cols = ["direction", "index", "side", "rank", "token_id", "token", "logit"]
    if isinstance(weights, str):
        return pd.DataFrame(columns=cols)
    logits = weights.logits(basis)
    promoted, suppressed = top_tokens(logits, n)
    rows = []
    for j in range(basis.shape[1]):
        for side, ids in (("promoted", promoted[:, j]), ("suppressed", suppressed[:, j])):
            rows += [{"direction": j, "index": int(index[j]), "side": side, "rank": r,
                      "token_id": int(t), "token": decode(t), "logit": float(logits[t, j])}
                     for r, t in enumerate(ids)]
    return pd.DataFrame(rows, columns=cols)


def _buckets(stats: Any, index: np.ndarray) -> pd.DataFrame:
    b = frequency_buckets(stats.types.counts.numpy(), stats.types.sumsq.numpy())
    rows = [{"direction": j, "index": int(index[j]), "bucket": str(b["bucket"][i]),
             "n_types": int(b["n_types"][i]), "n_tokens": int(b["n_tokens"][i]),
             "token_share": float(b["token_share"][i]),
             "variance_share": float(b["variance_share"][i, j])}
            for j in range(len(index)) for i in range(3)]
    return pd.DataFrame(rows)


def _directions(chosen: Any, stats: Any, sign: np.ndarray, examples: pd.DataFrame,
                meta: dict) -> pd.DataFrame:
    n = max(stats.n_tokens, 1)
    s1 = stats.types.sums.sum(0).numpy() * sign
    s2 = stats.types.sumsq.sum(0).numpy()
    mean = s1 / n
    top = examples[examples.side == "top"]
    share = top.groupby("direction")["token_id"].agg(
        lambda t: t.value_counts().iloc[0] / len(t))
    return pd.DataFrame({
        "direction": np.arange(len(sign)), "index": chosen.index, "kind": chosen.kind,
        "layer": meta["layer"], "point": meta["point"], "eigenvalue": chosen.variance,
        "variance_share": chosen.variance_share, "reinjected": chosen.reinjected,
        "sign": sign.astype(int), "mean_projection": mean,
        "std_projection": np.sqrt(np.maximum(s2 / n - mean**2, 0.0)),
        "top_token_share": share.reindex(np.arange(len(sign))).to_numpy(),
        "n_tokens": stats.n_tokens})


def build_report(root: torch.nn.Module, site: Any, point: str, chosen: Any, stats: Any,
                 tokenizer: Any, spectra: Any, *, directions_spec: Any, opts: Any
                 ) -> DirectionReport:
    """The report of a finished pass (signs fixed, readout read, frames built)."""
    from .capture.finish import model_label

    sign = _signs(stats)
    basis = chosen.basis * sign[None, :]
    decode, index = _Decoder(tokenizer), chosen.index
    weights = readout_weights(root, site, point, basis.shape[0])
    meta = {"format": "nerve_interp.directions", "version": __version__,
            "model": model_label(root), "spectra_model": spectra.model, "layer": site.layer,
            "point": point, "site": site.name(point),
            "directions": directions_spec if isinstance(directions_spec, str)
            else ("custom" if (chosen.kind == "custom").all() else [int(i) for i in index]),
            "kinds": sorted(set(chosen.kind.tolist())), "n_tokens": stats.n_tokens,
            "k_examples": opts.k_examples,
            "context": [opts.before, opts.after], "max_tokens": opts.max_tokens,
            "exclude_positions": list(opts.exclude_positions), "min_count": opts.min_count,
            "readout": weights.names if isinstance(weights, ReadoutWeights) else None,
            "readout_note": weights if isinstance(weights, str) else
            "direct effect W_U (γ ⊙ W_down u), γ the final norm's weight; logits per unit "
            "projection"}
    examples = _examples(stats, sign, decode, index)
    frames = {"examples": examples,
              "directions": _directions(chosen, stats, sign, examples, meta),
              "tokens": _tokens(stats, sign, decode, index, opts.n_tokens, opts.min_count),
              "readout": _readout(weights, basis, decode, index, opts.n_tokens),
              "buckets": _buckets(stats, index)}
    return DirectionReport(frames, meta)


# ------------------------------------------------------------------ HTML
_CSS = """
.ni-report{font-family:system-ui,-apple-system,Segoe UI,sans-serif;font-size:13px;color:#222}
.ni-card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:10px 0;
 background:#fff}
.ni-card h3{margin:2px 0 6px 0;font-size:15px}
.ni-meta{color:#555;margin-bottom:6px}
.ni-cols{display:flex;gap:16px;flex-wrap:wrap}
.ni-col{flex:1 1 380px;min-width:300px}
.ni-ctx{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;
 margin:1px 0;line-height:1.5}
.ni-ctx span{border-radius:2px}
.ni-ctx .ni-c{outline:1.5px solid #222}
.ni-v{color:#666;display:inline-block;width:64px;text-align:right;margin-right:6px}
.ni-list{font-family:ui-monospace,Menlo,Consolas,monospace}
.ni-note{color:#777;font-style:italic}
table.ni-b{border-collapse:collapse}table.ni-b td{padding:1px 6px}
"""


def _color(p: float, scale: float) -> str:
    a = min(1.0, abs(p) / scale) if scale > 0 else 0.0
    rgb = "220,70,40" if p > 0 else "40,100,220"
    return f"rgba({rgb},{0.85 * a:.2f})"


def _context_html(row: Any, scale: float) -> str:
    spans = []
    for i, (t, p) in enumerate(zip(row["context"], row["context_projection"], strict=True)):
        cls = " class='ni-c'" if i == row["center"] else ""
        spans.append(f"<span{cls} style='background:{_color(p, scale)}' "
                     f"title='{p:.3g}'>{html.escape(t)}</span>")
    return (f"<div class='ni-ctx'><span class='ni-v'>{row['projection']:.3g}</span>"
            f"{''.join(spans)}</div>")


def _token_list(df: pd.DataFrame, value: str, extra: str = "") -> str:
    items = [f"{html.escape(repr(r.token))} <span class='ni-v'>{getattr(r, value):.3g}</span>"
             + (f" ×{getattr(r, extra)}" if extra else "") for r in df.itertuples()]
    return "<div class='ni-list'>" + "<br>".join(items) + "</div>"


def _header(rep: DirectionReport) -> str:
    m = rep.metadata
    return (f"<h2>{html.escape(str(m.get('model')))} · {html.escape(str(m.get('site')))}</h2>"
            f"<div class='ni-meta'>directions {html.escape(str(m.get('directions')))} · "
            f"{m.get('n_tokens')} tokens · readout: {html.escape(str(m.get('readout_note')))}"
            "</div>")


def _card(rep: DirectionReport, j: int) -> str:
    d = rep.directions[rep.directions.direction == j].iloc[0]
    ex = rep.examples[rep.examples.direction == j]
    scale = float(ex.projection.abs().max()) if len(ex) else 1.0
    label = f"u<sub>{d['index']}</sub>" if d["index"] >= 0 else f"custom {j}"
    head = (f"<h3>{label} · {html.escape(str(d['kind']))}</h3><div class='ni-meta'>"
            f"eigenvalue {d['eigenvalue']:.4g} · {100 * d['variance_share']:.2f}% of the "
            f"variance · projection mean {d['mean_projection']:.3g}, std "
            f"{d['std_projection']:.3g} · top-token share {d['top_token_share']:.2f}"
            + (f" · reinjected {d['reinjected']:.3g}" if np.isfinite(d["reinjected"]) else "")
            + "</div>")
    cols = []
    for side in ("top", "bottom"):
        rows = ex[ex.side == side]
        cols.append(f"<div class='ni-col'><b>{side} examples</b>"
                    + "".join(_context_html(r, scale) for _, r in rows.iterrows()) + "</div>")
    return (f"<div class='ni-card'>{head}<div class='ni-cols'>{''.join(cols)}</div>"
            f"<div class='ni-cols'>{_side_lists(rep, j)}</div></div>")


def _side_lists(rep: DirectionReport, j: int) -> str:
    tok = rep.tokens[rep.tokens.direction == j]
    ro = rep.readout[rep.readout.direction == j]
    out = [f"<div class='ni-col'><b>tokens, highest mean projection</b>"
           f"{_token_list(tok[tok.side == 'high'], 'mean_projection', 'count')}</div>",
           f"<div class='ni-col'><b>tokens, lowest mean projection</b>"
           f"{_token_list(tok[tok.side == 'low'], 'mean_projection', 'count')}</div>"]
    if len(ro):
        out += [f"<div class='ni-col'><b>promoted (logit)</b>"
                f"{_token_list(ro[ro.side == 'promoted'], 'logit')}</div>",
                f"<div class='ni-col'><b>suppressed (logit)</b>"
                f"{_token_list(ro[ro.side == 'suppressed'], 'logit')}</div>"]
    else:
        note = html.escape(str(rep.metadata.get("readout_note", "")))
        out.append(f"<div class='ni-col'><span class='ni-note'>{note}</span></div>")
    b = rep.buckets[rep.buckets.direction == j]
    cells = "".join(f"<tr><td>{r.bucket}</td><td>{100 * r.variance_share:.1f}% of variance"
                    f"</td><td>{100 * r.token_share:.1f}% of tokens</td><td>{r.n_types} types"
                    "</td></tr>" for r in b.itertuples())
    out.append(f"<div class='ni-col'><b>frequency buckets</b><table class='ni-b'>{cells}"
               "</table></div>")
    return "".join(out)


__all__ = ["FRAMES", "DirectionReport", "build_report"]
