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


def test_own_project_example_runs(tmp_path):
    script = tmp_path / "own_project.py"
    script.write_text(_example("own-project"))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "{'dead_heads': 4}" in proc.stdout  # 2 layers x 4 heads, half switched off
    assert "100.0%" in proc.stdout or "100%" in proc.stdout  # the coverage report


def test_own_project_slimmable_example_runs(tmp_path):
    script = tmp_path / "own_project_slimmable.py"
    script.write_text(_example("own-project-slimmable"))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^(w\S+): accuracy ([\d.]+), ([\d,]+) parameters$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["w1/2-d1/2", "w1/2-d1", "w1-d1"], proc.stdout
    params = [int(r[2].replace(",", "")) for r in rows]
    assert params[0] < params[1] < params[2]  # every submodel really is smaller
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)
    assert proc.stdout.rstrip().endswith("Linear")  # teardown left the plain full model
