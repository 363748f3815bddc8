"""The residualizer contract: a new method is one class. A toy residualizer (per-prompt means, a nuisance
registered here too) defined in this file, and nothing else edited, is offered by the app with its declared
parameter, runs through the removal's tests and cross-fit, names what it removed on screen, appears in the
per-layer report and is cached under its own key."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.nuisances import NUISANCES, Nuisance, Param, register_nuisance
from analysis.residualize import RESIDUALIZERS, LabelStats, Residualizer, ResidualSpec, register


class PromptMean(Residualizer):
    """x - s * (mean latent of the token's prompt), the means fitted on other branches (folds of branches)."""

    name = "toy_prompt_mean"
    label = "toy: per-prompt mean"
    help = (
        "Subtracts each prompt's mean latent (a toy for the contract test). Cannot reach exact subtraction."
    )
    removes = ("prompt",)
    params = (Param("strength", 1.0, "Strength", "Share of the prompt mean subtracted.", "float", 0.0, 1.0),)
    fold_unit = "branch"
    sufficient = True
    menu_order = 5  # after auto, position and token (0-2), before the rest (100)
    means_of = "prompt"  # it is the plain per-label means of its nuisance
    alternative = ("none", "Show no removal", "The raw latents, centred")

    @classmethod
    def describe(cls, spec):
        return f"prompt mean x{spec.strength:g}"

    def fit_cov(self, X, cov):
        self.fit_stats(LabelStats.of(X, cov["prompt"]))

    def fit_stats(self, stats: LabelStats) -> PromptMean:
        self.labels_, self.means_ = stats.labels, (stats.sums / stats.counts[:, None]).astype(np.float32)
        return self

    def component_of(self, X, cov):
        idx = np.minimum(np.searchsorted(self.labels_, cov["prompt"]), len(self.labels_) - 1)
        return self.spec.strength * self.means_[idx]


@pytest.fixture
def toy():
    """Register the toy and its nuisance for one test, and take them away after it."""
    register_nuisance(
        Nuisance("prompt", "prompt", "prompt content", guard=None, centre=None, shuffle="between:branch")
    )
    register(PromptMean)
    yield PromptMean
    RESIDUALIZERS.pop(PromptMean.name, None)
    NUISANCES.pop("prompt", None)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    from helpers import synthetic_store as write

    return write(tmp_path_factory.mktemp("contract") / "s.duckdb", 4, 4, 24, 32)


def test_the_spec_checks_the_toys_declared_parameter(toy):
    assert ResidualSpec(method=toy.name).strength == 1.0
    assert ResidualSpec(method=toy.name, strength=0.5).to_dict()["params"] == {"strength": 0.5}
    with pytest.raises(ValueError, match="strength must be <= 1"):
        ResidualSpec(method=toy.name, strength=2.0)
    with pytest.raises(ValueError, match="no parameter 'k'"):
        ResidualSpec(method=toy.name, k=3)


def test_the_toy_is_tested_cross_fitted_and_removes_prompt_content(toy):
    from analysis import ViewSpec, compute_view
    from analysis.project import ProjectionSpec
    from analysis.synthetic import branch_tree

    tree = branch_tree(
        n_prompts=4, branches_per_prompt=6, length=40, d=32, pos_scale=0.0, content_scale=2.0, seed=1
    )
    spec = ViewSpec(residual=ResidualSpec(method=toy.name), projection=ProjectionSpec(method="pca"))
    result = compute_view(tree, spec)
    rem = result.metrics["removal"]
    assert rem["removes"] == ["prompt"] and rem["tests"]["prompt"]["detected"] and rem["fold_by"] == "branch"
    assert rem["crossfit"] and rem["weight"] > 0.5
    raw = compute_view(
        tree, ViewSpec(residual=ResidualSpec(method="none"), projection=ProjectionSpec(method="pca"))
    )

    def prompt_share(X, prompt):  # share of the variance between the prompts' means
        means = np.stack([X[prompt == p].mean(axis=0) for p in np.unique(prompt)])
        counts = np.bincount(prompt)[np.unique(prompt)]
        return float(
            (counts * ((means - X.mean(axis=0)) ** 2).sum(axis=1)).sum() / ((X - X.mean(axis=0)) ** 2).sum()
        )

    prompt = tree.prompt[result.index]
    assert prompt_share(result.residual, prompt) < 0.2 * prompt_share(raw.residual, tree.prompt[raw.index])


def test_the_app_offers_the_toy_with_its_control_and_names_what_it_removed(
    toy, synthetic_store, monkeypatch, tmp_path
):
    from helpers import app_on

    at = app_on(synthetic_store, monkeypatch, tmp_path)
    options = at.selectbox(key="method").options
    assert options.index(toy.label) == 3 and options[-1] == RESIDUALIZERS["none"].label  # its menu_order
    at.selectbox(key="method").set_value(toy.name).run()
    assert not at.exception, [e.value for e in at.exception]
    slider = at.slider(key=f"{toy.name}::strength")
    assert slider.value == 1.0 and slider.label == "Strength"
    text = " ".join(m.value for m in at.markdown)
    assert "prompt content component was detected" in text or "No prompt content component detected" in text
    switch = at.button(key=f"alternative::{toy.name}")  # its declared one-click alternative
    assert switch.label == "Show no removal"
    switch.click().run()
    assert not at.exception and at.selectbox(key="method").value == "none"


def test_auto_offers_position_alone_in_one_click(synthetic_store, monkeypatch, tmp_path):
    from helpers import app_on

    at = app_on(synthetic_store, monkeypatch, tmp_path)
    assert at.selectbox(key="method").value == "auto"
    switch = at.button(key="alternative::auto")
    assert switch.label == "Remove position only"
    switch.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="method").value == "position"
    assert not [b for b in at.button if b.key and b.key.startswith("alternative::")]  # position offers none


def test_the_report_and_the_cache_take_the_toy(toy, synthetic_store, tmp_path):
    from analysis import ViewSpec
    from analysis.project import ProjectionSpec
    from views.cache import ViewCache
    from views.report import layer_report
    from views.service import Selection, compute

    cache = ViewCache(tmp_path / "cache")
    rows = layer_report(synthetic_store, methods=("none", toy.name), projection="pca", cache=cache)
    assert {r["method"] for r in rows} == {"raw", "prompt mean x1"}
    sel = Selection("run-synthetic-helix", 1)
    half = ViewSpec(
        residual=ResidualSpec(method=toy.name, strength=0.5), projection=ProjectionSpec(method="pca")
    )
    first = compute(synthetic_store, sel, half, cache)
    again = compute(synthetic_store, sel, half, cache)
    full = ViewSpec(residual=ResidualSpec(method=toy.name), projection=half.projection)
    other = compute(synthetic_store, sel, full, cache)  # another value of the toy's parameter: its own key
    assert first.timings["cached"] == 0.0 and again.timings["cached"] == 1.0
    assert (
        other.timings["cached"] == 0.0 and compute(synthetic_store, sel, full, cache).timings["cached"] == 1.0
    )
    np.testing.assert_array_equal(first.result.coords, again.result.coords)


def test_every_declared_alternative_names_a_registered_method():
    """A method's one-click alternative must name a method the menu offers (a typo would make the button
    do nothing: the sidebar drops an unknown method)."""
    declared = {name: cls.alternative for name, cls in RESIDUALIZERS.items() if cls.alternative}
    assert declared, "no method declares an alternative (auto's is Remove position only)"
    for name, (other, label, help_text) in declared.items():
        assert other in RESIDUALIZERS and other != name and label and help_text, name


def test_each_nuisance_names_its_plain_means_by_the_class_that_declares_them(toy):
    """A joint estimator checks each nuisance against its plain per-label means out of fold; the method
    that subtracts them is found by its class's means_of, not by a name written elsewhere."""
    from analysis.residualize import means_method

    assert means_method("prompt") == toy.name
    assert RESIDUALIZERS[means_method("position")].removes == ("position",)
    assert RESIDUALIZERS[means_method("token")].removes == ("token",)
    with pytest.raises(ValueError, match="no registered method subtracts per-label means of 'branch'"):
        means_method("branch")
