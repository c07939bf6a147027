"""``xbt demo``: the step sequence, its summary, and its cache (a finished step is skipped)."""

import json
import logging

import pytest

from xbt.cli import main


@pytest.mark.slow
def test_demo_reuses_trained_models_and_runs_the_whole_pipeline(trained_pair, capsys, caplog):
    output = trained_pair.train.parent.parent  # the fixture trained the fast preset in the demo's layout
    weights = sorted((output / "models").glob("*/*.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in weights]
    with caplog.at_level(logging.INFO, logger="xbt"):
        assert main(["demo", "--preset", "fast", "--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["models"]["old"]["reference"] == trained_pair.old
    assert summary["models"]["new"]["reference"] == trained_pair.new
    assert len(weights) == 2 and [path.stat().st_mtime_ns for path in weights] == stamps  # cached, not retrained
    assert sum("model: already done" in record.message for record in caplog.records) == 2
    for direction in ("text→image", "image→text"):
        assert summary["retrieval"]["new→new"][direction]["1"] > summary["retrieval"]["old→old"][direction]["1"]
    printed = capsys.readouterr().out
    assert "old→old" in printed and "new→new" in printed and "summary.json" in printed

    # The XBT steps: an adapter whose queries beat old→old against the untouched old gallery.
    cells = summary["compatibility"]
    assert (output / "xbt" / "stage2" / "adapter" / "xbt_config.json").is_file()
    assert (output / "eval" / "matrix.png").is_file() and (output / "fit.yaml").is_file()
    assert summary["report"] == str(output / "eval" / "report.html") and summary["report"] in printed
    assert (output / "eval" / "report.html").read_text().count("<img") > 3  # plots and example images
    assert cells["image→text xbt→old"]["compatible"]["10"]
    assert cells["text→image xbt→old"]["recall"]["10"] >= cells["text→image old→old"]["recall"]["10"]
    assert {"text→image stage1→old", "text→image procrustes→old", "text→image ridge→old"} <= set(cells)
    # Stage 2 had the stored gallery, so the adapter carries FastFill's head and eval orders backfilling by it too.
    assert (output / "xbt" / "stage2" / "adapter" / "uncertainty" / "model.safetensors").is_file()
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    for key in ("backfill", "backfill_new_model"):
        assert set(metrics[key]) == {"text→image", "image→text"}
        assert all("uncertainty" in curve["orderings"] for curve in metrics[key].values())

    adapter = output / "xbt" / "stage2" / "adapter" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xbt"):
        assert main(["demo", "--preset", "fast", "--output", str(output)]) == 0  # everything cached now
    again = json.loads((output / "summary.json").read_text())
    assert adapter.stat().st_mtime_ns == stamp and again["compatibility"] == cells
    skipped = [record.message for record in caplog.records if "already done" in record.message]
    assert len(skipped) == 5, skipped  # both models, the stored gallery, stage 1 and stage 2
