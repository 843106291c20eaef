"""The README's own-project examples run as written, in a plain Lightning project (a
compression callback; SlimmableTraining on a BERT encoder with the classifier head outside it)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example(tag: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- readme-example: {tag} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no example tagged {tag!r}"
    return match.group(1)


def _run_example(tag: str, folder) -> str:
    """Run the README's example ``tag`` as a script in ``folder``; its standard output."""
    script = folder / f"{tag.replace('-', '_')}.py"
    script.write_text(_example(tag))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_own_project_example_runs(tmp_path):
    out = _run_example("own-project", tmp_path)
    assert "{'dead_heads': 4}" in out  # 2 layers x 4 heads, half switched off
    assert "100.0%" in out or "100%" in out  # the coverage report


def test_own_project_adapter_example_runs(tmp_path):
    (tmp_path / "ex.py").write_text(_example("own-project") + _example("own-project-adapter"))
    proc = subprocess.run(
        [sys.executable, "ex.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "True ['adapter.0.bias', 'adapter.0.weight']" in proc.stdout


def test_own_project_slimmable_example_runs(tmp_path):
    out = _run_example("own-project-slimmable", tmp_path)
    rows = re.findall(r"^(w\S+): accuracy ([\d.]+), ([\d,]+) parameters$", out, re.M)
    assert [r[0] for r in rows] == ["w1/2-d1/2", "w1/2-d1", "w1-d1"], out
    params = [int(r[2].replace(",", "")) for r in rows]
    assert params[0] < params[1] < params[2]  # every submodel really is smaller
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)
    assert out.rstrip().endswith("Linear")  # teardown left the plain full model


def test_own_project_skipping_example_runs(tmp_path):
    out = _run_example("own-project-skipping", tmp_path)
    chosen = re.search(r"^skipped: \['encoder\.layer\.(\d)'\]", out, re.M)
    assert chosen, out
    full, skipped = (
        int(x.replace(",", ""))
        for x in re.search(r"MACs per example: ([\d,]+) -> ([\d,]+)", out).groups()
    )
    assert skipped < full
