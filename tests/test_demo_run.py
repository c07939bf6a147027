"""``xbt demo``: the step sequence, its summary, and its cache (a finished step is skipped)."""

import json

import pytest

from xbt.cli import main


@pytest.mark.slow
def test_demo_reuses_trained_models_and_runs_the_whole_pipeline(trained_pair, capsys):
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

    # The XBT steps: an adapter whose queries beat old→old against the untouched old gallery.
    cells = summary["compatibility"]
    assert (output / "xbt" / "stage2" / "adapter" / "xbt_config.json").is_file()
    assert (output / "eval" / "matrix.png").is_file() and (output / "fit.yaml").is_file()
    assert cells["image→text xbt→old"]["compatible"]["10"]
    assert cells["text→image xbt→old"]["recall"]["10"] >= cells["text→image old→old"]["recall"]["10"]
    assert {"text→image stage1→old", "text→image procrustes→old", "text→image ridge→old"} <= set(cells)

    assert main(["demo", "--preset", "fast", "--output", str(output)]) == 0  # everything cached now
    again = json.loads((output / "summary.json").read_text())
    assert again["seconds"]["fit"] < 5 and again["compatibility"] == cells
