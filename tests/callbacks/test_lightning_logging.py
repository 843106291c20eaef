"""Importing our callbacks (which load both Lightning packages) leaves Lightning's log routing
as the user's project set it up."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("first", ["lightning.pytorch", "pytorch_lightning"])
def test_import_keeps_the_projects_lightning_logger(first):
    pytest.importorskip("pytorch_lightning")
    code = (
        f"import {first}\n"
        "from lightning_utilities.core import rank_zero\n"
        "before = rank_zero.log.name\n"
        "import vlcompress.callbacks\n"
        "print(before, rank_zero.log.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert before.startswith(first) and after == before
