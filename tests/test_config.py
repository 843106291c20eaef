"""Experiments: every file validates; bad configs report every problem at once."""

import pytest

from vlcompress.cli import main
from vlcompress.config import ConfigError, list_experiments, load_experiment, validate


@pytest.mark.parametrize("name", list_experiments())
def test_every_experiment_validates(name):
    cfg, raw = load_experiment(name)
    assert cfg.name == name
    assert "defaults" not in raw


def test_there_are_experiments_and_a_default():
    assert "default" in list_experiments()


def test_all_errors_reported_at_once_with_suggestions():
    with pytest.raises(ConfigError) as e:
        load_experiment(
            "default",
            [
                "data.batchsize=3",
                "optim.lr=-1",
                "trainer.max_epochs=abc",
                "data.split=cpp",
                "model.options.hiden_size=8",
                "task.loss=lmh",
            ],
        )
    errs = e.value.errors
    assert len(errs) == 6
    text = "\n".join(errs)
    assert "data.batchsize: unknown key; did you mean 'batch_size'" in text
    assert "optim.lr: must be > 0.0, got -1" in text
    assert "trainer.max_epochs: expected int, got str 'abc'" in text
    assert "data.split: 'cpp' is not one of ['standard', 'cp']" in text
    assert "model.options.hiden_size: unknown key; did you mean 'hidden_size'" in text
    assert "task.loss: 'lmh' is not one of" in text


def test_unknown_experiment_lists_available():
    with pytest.raises(ConfigError, match="Available: .*default") as e:
        load_experiment("defualt")
    assert "Did you mean default" in str(e.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_experiment("default", ["trainer.max_epochs"])


def test_unknown_callback_named():
    with pytest.raises(ConfigError, match="unknown callback 'magnitude_prune'"):
        validate({"callbacks": [{"name": "magnitude_prune"}]})


def test_overrides_apply_and_types_build():
    cfg, _ = load_experiment(
        "default", ["trainer.max_epochs=2", "data.split=cp", "output_dir=/tmp/x"]
    )
    assert cfg.trainer.max_epochs == 2 and cfg.data.split == "cp" and cfg.output_dir == "/tmp/x"
    assert cfg.model.options["visual_input"] == "grid"


def test_cli_exit_codes(capsys):
    assert main(["validate", "default"]) == 0
    assert main(["validate", "default", "data.batchsize=3", "foo=1"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "foo: unknown key" in err
    assert main(["train", "nope"]) == 2
