"""Two DDP processes (Lightning's own launcher, gloo on the CPU) through the normal entry point:
one run folder, only rank 0 writes, and every test question counted exactly once — the same
test metrics as one process evaluating the same checkpoint."""

import json
import shutil
import subprocess
import sys


def _train(cwd, args, timeout=600):
    cmd = [sys.executable, "-m", "vlcompress", "train", "default", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_share_one_folder_and_count_every_question_once(tmp_path, tiny_run):
    same = [
        *tiny_run,
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.limit_test_batches=1.0",  # the whole test split: 9,673 questions
    ]
    ddp = ["trainer.devices=2", "trainer.strategy=ddp"]
    # Trained by two processes, no output_dir: rank 0 picks the folder, rank 1 follows.
    (tmp_path / "ddp").mkdir()
    _train(tmp_path / "ddp", [*same, *ddp])
    folders = list((tmp_path / "ddp" / "runs" / "default").iterdir())
    assert len(folders) == 1, folders
    (folder,) = folders
    assert json.loads((folder / "run.json").read_text())["status"] == "finished"
    assert (folder / "run.log").read_text().count("run folder:") == 1  # rank 0 alone writes
    two = json.loads((folder / "results.json").read_text())
    assert two["test"]["questions"] == 9673  # a padded sampler would count 9,674
    # The same checkpoint tested by one process and by two: identical metrics.
    single, again = tmp_path / "single", tmp_path / "single-under-ddp"
    _train(tmp_path, [*same, f"output_dir={single}"])
    shutil.copytree(single, again)
    _train(tmp_path, [*same, *ddp, f"output_dir={again}", "resume=true"])
    one = json.loads((single / "results.json").read_text())["test"]
    both = json.loads((again / "results.json").read_text())["test"]
    assert one["questions"] == both["questions"] == 9673
    assert both["accuracy"] == one["accuracy"]
    assert both["answer_type"] == one["answer_type"]
