"""benchmarks/accuracy.py runs end to end in its smoke mode (digits only, a few seconds)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_accuracy_script_quick_mode(tmp_path):
    out, doc = tmp_path / "accuracy.json", tmp_path / "accuracy.md"
    doc.write_text("before\n<!-- accuracy-table -->\nold\n<!-- /accuracy-table -->\nafter\n")
    # The installed package (this interpreter's), not the source tree: that has no compiled extension.
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--out", str(out), "--doc", str(doc)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    saved = json.loads(out.read_text())
    assert {(r["method"], r["sparsity"]) for r in saved["results"]} == {("dense", None), ("rigl", 0.9), ("srigl", 0.9), ("srigl_g8", 0.9)}
    for r in saved["results"]:
        assert r["task"] == "digits_mlp" and 0 <= r["accuracy"] <= 100
    assert saved["summary"]["digits_mlp/dense/None"]["n"] == 1
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| grouped SRigL g=8 |" in text and "g=8" in text.split("Gate")[1]
