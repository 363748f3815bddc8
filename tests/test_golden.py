"""What the app and the report print, against a recorded copy (issue 31: "every number the app and the
report print is identical before and after", kept as a test so refactors stay behaviour-free).

Synthetic regimes with known parts (analysis.regimes), PCA layouts (seeded, no UMAP), and the printed
text only: the verdict's sentences, the metrics table's rows, the per-layer table as the CLI prints it
and the guard's messages, all rounded as shown. A change meant to alter them is recorded with

    BRANCHLENS_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

and the diff of tests/golden/printed.json is then read in review like any other change.
"""

from __future__ import annotations

import json
import os
from dataclasses import astuple
from pathlib import Path

import pytest

from analysis import ResidualSpec, ViewSpec, compute_view
from analysis.guard import check
from analysis.project import ProjectionSpec
from analysis.regimes import generate
from analysis.verdict import headline_and_details
from analysis.view import layer_stats
from views import layer_table
from views.present import layout_note, metric_rows

GOLDEN = Path(__file__).parent / "golden" / "printed.json"
CASES = [("helix", 1), ("weak_linear", 0), ("token_only", 0)]
METHODS = ("auto", "position", "per_position")


def printed(regime: str, seed: int) -> dict:
    """Everything the screen and the report print for one run, raw and after each method."""
    run = generate(regime, seed, n_prompts=4, branches=5, length=30)
    pca = ProjectionSpec(method="pca")
    raw = compute_view(run.tokens, ViewSpec(residual=ResidualSpec(method="none"), projection=pca)).metrics
    raw |= layer_stats(run.tokens)
    out, rows = {}, [layer_table.row(0, "raw", raw)]
    for method in METHODS:
        after = compute_view(
            run.tokens, ViewSpec(residual=ResidualSpec(method=method), projection=pca)
        ).metrics
        rows.append(layer_table.row(0, method, after))
        out[method] = {
            "verdict": list(headline_and_details(raw, after)),
            "metrics table": [list(astuple(r)) for r in metric_rows(raw, after)],
            "guard": [w.message for w in check(raw, after)],
            "layout note": layout_note(raw, after),
        }
    out["per-layer table"] = layer_table.text(rows).splitlines()
    return out


@pytest.fixture(scope="module")
def now() -> dict:
    return {f"{regime}/{seed}": printed(regime, seed) for regime, seed in CASES}


def test_what_the_app_and_the_report_print_is_what_was_recorded(now):
    if os.environ.get("BRANCHLENS_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(
            json.dumps(now, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
        )
    recorded = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert recorded.keys() == now.keys()
    for case in now:
        for part in now[case]:
            assert now[case][part] == recorded[case][part], (case, part)
