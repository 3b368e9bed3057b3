"""Site grammar round trips and per-family site discovery."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_tiny

import nerve_interp as ni
from nerve_interp.errors import SiteError, UnknownArchitectureError
from nerve_interp.sites import POINTS, parse_site, select_sites, site_name

EXPECTED = {
    "gpt2": ("plain", "transformer.h.1.mlp.act.input"),
    "pythia": ("plain", "gpt_neox.layers.1.mlp.act.input"),
    "llama": ("gated", "model.layers.1.mlp.act_fn.input"),
    "mistral": ("gated", "model.layers.1.mlp.act_fn.input"),
    "qwen2": ("gated", "model.layers.1.mlp.act_fn.input"),
    "gemma3": ("gated", "model.layers.1.mlp.act_fn.input"),
    "opt": ("plain", "model.decoder.layers.1.activation_fn.input"),
    "bert": ("plain", "encoder.layer.1.intermediate.intermediate_act_fn.input"),
}


def test_grammar_round_trip():
    for layer in range(40):
        for point in POINTS:
            assert parse_site(site_name(layer, point)) == (layer, point)
    assert site_name(-1, "post", n_layers=12) == "layers.11.ffn.post"
    assert site_name("layers.3.ffn.pre") == "layers.3.ffn.pre"


@pytest.mark.parametrize("bad,msg", [
    ("layers.3.ffn.mid", "unknown point 'mid'"),
    ("layer.3.pre", "not a site name"),
])
def test_grammar_errors(bad, msg):
    with pytest.raises(SiteError, match=msg):
        parse_site(bad)
    with pytest.raises(SiteError, match="out of range"):
        site_name(12, "pre", n_layers=12)


@pytest.mark.parametrize("family", sorted(TINY))
def test_families(family):
    model = make_tiny(family)
    sites = ni.find_ffn_sites(model)
    kind, pre1 = EXPECTED[family]
    assert len(sites) == 3
    assert sites[1].kind == kind and sites[1].paths["pre"] == pre1
    assert sites[1].points == (("pre", "act", "up", "post") if kind == "gated" else ("pre", "post"))
    for s in sites:  # every path names a real module
        for path in s.paths.values():
            model.get_submodule(path.rsplit(".", 1)[0])
    if kind == "plain":
        with pytest.raises(SiteError, match="no 'up' point"):
            sites[0].path("up")


def test_nnsight_wrapped_model_is_accepted():
    import nnsight

    sites = ni.find_ffn_sites(nnsight.NNsight(make_tiny("gpt2")))
    assert sites[2].paths["post"] == "transformer.h.2.mlp.act.output"


class _FunctionalMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc_out(torch.nn.functional.gelu(self.fc_in(x)))


class _Block(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x)


class FunctionalNet(torch.nn.Module):
    """A model whose FFN activation is a function call, not a module."""

    def __init__(self, n=3):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(_FunctionalMLP()) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_function_activation_found_through_source():
    sites = ni.find_ffn_sites(FunctionalNet())
    assert sites[1].paths["post"] == "blocks.1.mlp.source.torch_nn_functional_gelu_0.output"
    assert sites[1].family == "generic-source"


def test_unknown_architecture_lists_candidates():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([_Block(torch.nn.Linear(8, 8)) for _ in range(2)])

    with pytest.raises(UnknownArchitectureError) as err:
        ni.find_ffn_sites(Plain())
    msg = str(err.value)
    assert "Layer lists in this model: blocks (2 × _Block)" in msg
    assert 'ni.find_ffn_sites(model, pre="blocks.{layer}.mlp.act.input"' in msg
    assert "Known families:" in msg


def test_manual_templates():
    model = make_tiny("gpt2")
    sites = ni.find_ffn_sites(model, pre="transformer.h.{layer}.mlp.c_fc.output",
                              post="transformer.h.{layer}.mlp.c_proj.input")
    assert len(sites) == 3 and sites[2].paths["post"] == "transformer.h.2.mlp.c_proj.input"
    with pytest.raises(SiteError, match="no {layer} placeholder"):
        ni.find_ffn_sites(model, pre="transformer.h.0.mlp.act.input", post="x.{layer}.output")
    with pytest.raises(SiteError, match="no module at"):
        ni.find_ffn_sites(model, pre="nope.{layer}.act.input", post="nope.{layer}.act.output")
    with pytest.raises(SiteError, match=r"must end in \.input or \.output"):
        ni.find_ffn_sites(model, pre="transformer.h.{layer}.mlp.act", post="x.{layer}.output")


def test_select_sites():
    sites = ni.find_ffn_sites(make_tiny("llama"))
    assert [s.layer for s in select_sites(sites, [-1, 0])] == [0, 2]
    assert [s.layer for s in select_sites(sites, lambda s: s.layer % 2 == 0)] == [0, 2]
    with pytest.raises(SiteError, match="out of range: this model has 3 FFN layers"):
        select_sites(sites, 3)
