"""The run report's operating points and one-line recommendation (pure functions over run records)."""

from kvconvert.recipe.report import operating_points, recommendation, report_rows

SOURCE = {"spec": "src", "kv_bytes_per_token": 3000, "kv_gib": 1.0}


def _rec(folder, step, model, kv, figures=None, metrics=None):
    return {"folder": folder, "step": step, "model": model, "kv_bytes_per_token": kv, "kv_gib": 0.1,
            "seconds": 1.0, "figures": figures or {}, "metrics": metrics or {}}


def _run(latent_ppl=10.5, latent_needle=0.95):
    records = [
        _rec("01-eval", "eval", "source", 3000, {"perplexity": 10.0}),
        _rec("02-needle", "needle", "source", 3000, {"needle": 1.0}, {"retrieval": {"dense": 1.0}}),
        _rec("03-fit_latent", "fit_latent", "03-fit_latent", 900),
        _rec("04-eval", "eval", "03-fit_latent", 900, {"perplexity": latent_ppl}),
        _rec("05-sparse_policy", "sparse_policy", "03-fit_latent", 900, {"decode_read": 0.125},
             {"policy": "sink_window"}),
        _rec("06-needle", "needle", "03-fit_latent", 900, {"needle": 0.5},
             {"retrieval": {"dense": latent_needle, "sink_window": 0.5}}),
        _rec("07-mha_to_gqa", "mha_to_gqa", "07-mha_to_gqa", 1000),
        _rec("08-eval", "eval", "07-mha_to_gqa", 1000, {"perplexity": 30.0}),
    ]
    return report_rows(SOURCE, records), records


def test_points_per_model_and_policy_with_ratios():
    rows, records = _run()
    points = operating_points(rows, records, context=1024)
    labels = [p["label"] for p in points]
    assert labels == ["source", "03-fit_latent", "07-mha_to_gqa", "03-fit_latent + sink_window"]
    src, latent, mqa, sparse = points
    assert src["kv_read_mib"] == 3000 * 1024 / 2**20 and src["perplexity_ratio"] == 1.0
    assert latent["kv_ratio"] == 0.3 and latent["needle"] == 0.95 and abs(latent["perplexity_ratio"] - 1.05) < 1e-9
    assert sparse["needle"] == 0.5 and sparse["read_ratio"] == 0.3 * 0.125 and sparse["perplexity"] == 10.5
    assert "needle" not in mqa and mqa["perplexity_ratio"] == 3.0


def test_recommendation_picks_least_read_within_limits():
    rows, records = _run()
    line = recommendation(operating_points(rows, records, 1024))
    assert line.startswith("Recommended: 03-fit_latent:") and "3.3x smaller" in line  # the sparse one loses needle
    rows, records = _run(latent_ppl=12.0)
    line = recommendation(operating_points(rows, records, 1024))
    assert line.startswith("No operating point") and "closest: 03-fit_latent" in line
