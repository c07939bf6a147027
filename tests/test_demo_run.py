"""``xbt demo``: the step sequence, its summary, and its cache (a finished step is skipped)."""

import json

import pytest

from xbt.cli import main


@pytest.mark.slow
def test_demo_reuses_trained_models_and_reports_both_cells(trained_pair, capsys):
    output = trained_pair.train.parent.parent  # the fixture trained the fast preset in the demo's layout
    assert main(["demo", "--preset", "fast", "--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["models"]["old"]["reference"] == trained_pair.old
    assert summary["models"]["new"]["reference"] == trained_pair.new
    assert summary["seconds"]["old"] < 5 and summary["seconds"]["new"] < 5  # cached, not retrained
    for direction in ("text→image", "image→text"):
        assert summary["retrieval"]["new→new"][direction]["1"] > summary["retrieval"]["old→old"][direction]["1"]
    printed = capsys.readouterr().out
    assert "old→old" in printed and "new→new" in printed and "summary.json" in printed
