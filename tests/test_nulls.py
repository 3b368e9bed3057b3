"""Null models (nerve_interp.nulls, nerve_interp.reinitialized, nerve_interp.compare) on
inputs with known answers: Gaussian inputs have no excess reinjection, a two-component
mixture does; a diagonal covariance is its own independent-features null; white noise matches
the Marchenko-Pastur law."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import nerve_interp as ni
from nerve_interp.errors import NotFittedError
from nerve_interp.marchenko_pastur import white_noise_metrics
from nerve_interp.models import make_lm

D_IN, D_FF = 24, 48


class _FFN(nn.Module):
    def __init__(self, act: nn.Module, gated: bool, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(D_IN, d_ff) if gated else None
        self.up, self.act, self.down = nn.Linear(D_IN, d_ff), act, nn.Linear(d_ff, D_IN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


class _Net(nn.Module):
    """One FFN fed the input directly: its pre-activations are linear in the input."""

    def __init__(self, act: nn.Module, gated: bool = False, d_ff: int = D_FF) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList([_FFN(act, gated, d_ff)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


PLAIN = {"pre": "layers.{layer}.act.input", "post": "layers.{layer}.act.output"}
GATED = {"pre": "layers.{layer}.act.input", "act": "layers.{layer}.act.output",
         "up": "layers.{layer}.up.output", "post": "layers.{layer}.down.input"}


def _inputs(kind: str, n: int = 8192, seed: int = 0) -> list[torch.Tensor]:
    """Gaussian rows, or a two-component mixture: ±3 along the first 4 input axes (each
    with variance 9 + 0.1, as the Gaussian null's covariance will have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    if kind == "mixture":
        sign = torch.randint(0, 2, (n, 1), generator=g) * 2.0 - 1.0
        x[:, :4] = 3.0 * sign + 0.316 * x[:, :4]
    return list(x.split(512))


def _capture(net: nn.Module, kind: str, gated: bool) -> ni.SpectraResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = ni.find_ffn_sites(net, **(GATED if gated else PLAIN))
        return ni.collect_spectra(net.eval(), _inputs(kind), sites=sites,
                                  points=tuple(GATED if gated else PLAIN), joint=True,
                                  n_groups=8, progress=False,
                                  # fixed, because the sampled null's Monte Carlo draw
                                  # changes with any round-off change of the measurement:
                                  # fp32 vs fp64 here, measured soft-rank gain equal to 1e-6,
                                  # its difference from the null -0.0659 vs -0.0673 (se 0.013)
                                  precision="fp64")


def _excess(result: ni.SpectraResult) -> dict[str, tuple[float, float]]:
    null = ni.nulls.gaussian_equivalent(result, progress=False)
    t = ni.compare(result, null)
    t = t[t.point == "reinjection"].set_index("metric")
    return {m: (t.loc[m, "difference"], t.loc[m, "se"])
            for m in ("pr_gain", "soft_rank_gain", "delta_spectral_entropy")}


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU()], ids=["relu", "gelu"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gaussian_inputs_have_no_excess_reinjection(act, gated):
    result = _capture(_Net(act, gated), "gaussian", gated)
    assert result.metadata["activations"]["0"] == type(act).__name__.lower()
    for metric, (diff, se) in _excess(result).items():
        assert se > 0
        assert abs(diff) < 3 * se, (metric, diff, se)


@pytest.mark.parametrize(("gated", "sign"), [(False, -1), (True, 1)], ids=["plain", "gated"])
def test_a_mixture_input_has_excess_reinjection(gated, sign):
    """Two clusters along one input axis make every pre (and up) unit bimodal with the
    covariance unchanged. Then measured − Gaussian equivalent is clearly non-zero (more than
    5 standard errors here): negative for a plain ReLU FFN (on each cluster σ acts almost
    linearly, so it spreads less variance than on Gaussian inputs), positive for the gated
    one (gate and up share the bimodal direction, so their product adds a direction the
    Gaussian with the same covariance spreads less)."""
    result = _capture(_Net(nn.ReLU(), gated), "mixture", gated)
    for metric, (diff, se) in _excess(result).items():
        assert sign * diff > 5 * se, (metric, diff, se)


def test_independent_null_of_a_diagonal_covariance_is_the_measurement():
    net = _Net(nn.ReLU())
    with torch.no_grad():  # pre = diag(w) x + b: independent units of unequal variances
        net.layers[0].up.weight.zero_()
        net.layers[0].up.weight[:D_IN] = torch.diag(torch.linspace(0.2, 3.0, D_IN))
    metrics = ["participation_ratio", "soft_rank", "spectral_entropy"]
    t = ni.compare(diag := _capture(net, "gaussian", False),
                   ni.nulls.independent(diag, progress=False), metrics=metrics)
    assert len(t) == 6  # pre and post
    assert (t.difference.abs() < 3 * t.se).all(), t[["point", "metric", "difference", "se"]]
    # control: a random up-projection (48 units reading 24 inputs) correlates the units, so
    # the measured PR is far below the independent-units null
    t = ni.compare(rand := _capture(_Net(nn.ReLU()), "gaussian", False),
                   ni.nulls.independent(rand, progress=False), metrics=metrics[:1])
    assert (t.difference < -5 * t.se).all(), t[["point", "difference", "se"]]


@pytest.mark.parametrize("n_over_d", [1, 4, 16])
def test_marchenko_pastur_null_matches_the_law(n_over_d):
    d = 256  # the closed form is the large-D limit
    net = _Net(nn.ReLU(), d_ff=d)
    x = torch.randn(d * n_over_d, D_IN, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ni.collect_spectra(net.eval(), list(x.split(512)), points=("pre",),
                                    sites=ni.find_ffn_sites(net, **PLAIN), progress=False)
    null = ni.nulls.marchenko_pastur(result, n_groups=None, progress=False)
    spec = null.spectrum(0, "pre")
    assert spec.n_samples == d * n_over_d and spec.dim == d
    mp = white_noise_metrics(spec.n_samples, spec.dim)
    got = spec.metrics()
    for name in ("participation_ratio", "soft_rank", "spectral_entropy"):
        assert got[name] == pytest.approx(mp[name], rel=0.02), name
    # the total variance is kept, so eigenvalue plots share a scale
    measured = result.spectrum(0, "pre").eigenvalues.sum()
    assert spec.eigenvalues.sum() == pytest.approx(measured, rel=0.1)


def test_nulls_have_the_rows_of_the_measurement():
    ids = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(0))
    model = make_lm("tiny", seed=0, activation="swiglu", d_ff=32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ni.collect_spectra(model, list(ids.split(8)), points=("pre", "up", "post"),
                                    joint=True, n_groups=4, convergence=False,
                                    progress=False)
        nulls = [f(result, progress=False) for f in (
            ni.nulls.independent, ni.nulls.marchenko_pastur, ni.nulls.gaussian_equivalent)]
        nulls.append(ni.nulls.init(model, list(ids.split(8)), like=result, seed=1,
                                   progress=False))
    keys = ["layer", "point", "metric"]
    for null in nulls:
        assert null.metrics()[keys].equals(result.metrics()[keys])
        assert null.reinjection()[["layer"]].equals(result.reinjection()[["layer"]])
        assert null.metrics()["se"].notna().all()
    with pytest.raises(NotFittedError, match="convergence=False"):
        result.convergence()
    assert nulls[-1].metadata["convergence"] is False  # init took the measured options
    t = ni.compare(result, *nulls)
    assert set(t["null"]) == {"independent", "marchenko_pastur", "gaussian_equivalent", "init"}
    assert (t[t["null"] == "init"]["interval"] == "paired jackknife").all()
    assert (t[t["null"] != "init"]["interval"] == "quadrature").all()


def test_nulls_refuse_what_they_cannot_use(tmp_path):
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ni.collect_spectra(make_lm("tiny").eval(), list(ids.split(4)), progress=False)
    with pytest.raises(NotFittedError, match="joint=True"):
        ni.nulls.gaussian_equivalent(result)
    with pytest.raises(TypeError, match="SpectraResult"):
        ni.nulls.independent(result.metrics())
    with pytest.raises(ValueError, match="at least one null"):
        ni.compare(result)
    with pytest.raises(ni.errors.SiteError, match="points must include"):
        ni.collect_spectra(make_lm("tiny", activation="swiglu").eval(), list(ids.split(4)),
                           points=("pre", "post"), joint=True, progress=False)


def test_reinitialized_keeps_the_structure_and_changes_every_weight():
    model = make_lm("tiny", seed=0)
    with torch.no_grad():  # a "trained" model: no weight at its initial value
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a, b = ni.reinitialized(model, seed=5), ni.reinitialized(model, seed=5)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in a.named_parameters()] == names
    for (n, p), q, r in zip(model.named_parameters(), a.parameters(), b.parameters(),
                            strict=True):
        assert p.shape == q.shape and not torch.equal(p, q), n
        assert torch.equal(q, r), n
    assert a.nerve_interp_info["name"].endswith("(init, seed 5)")
    c = ni.reinitialized(model, seed=6)
    assert not torch.equal(next(c.parameters()), next(a.parameters()))


def test_joint_statistics_match_raw_hooks_and_survive_save_load(tmp_path):
    net = _Net(nn.GELU(), gated=True).eval()
    result = _capture(net, "mixture", True)
    x = torch.cat(_inputs("mixture")).double()
    ffn = net.layers[0].double()
    with torch.no_grad():
        ref = torch.cat([ffn.gate(x), ffn.up(x)], 1).numpy()
    j = result.joint[0]
    assert j.parts == ("pre", "up") and j.n_samples == x.shape[0]
    np.testing.assert_allclose(j.covariance, np.cov(ref, rowvar=False), rtol=1e-4,
                               atol=1e-5 * np.abs(j.covariance).max())
    back = ni.SpectraResult.load(result.save(tmp_path / "r.safetensors"))
    np.testing.assert_array_equal(back.joint[0].covariance, j.covariance)
    assert back.metadata["activations"] == {"0": "gelu"}


def test_compare_stays_a_function_after_its_module_is_imported():
    """The function ni.compare lives in nerve_interp.comparison: importing that submodule
    (as the CLI does) cannot bind a module over the package's function of the same name."""
    import importlib

    importlib.import_module("nerve_interp.comparison")
    assert callable(ni.compare) and ni.compare.__module__ == "nerve_interp.comparison"
