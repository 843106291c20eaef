"""Experiments: every file validates; bad configs report every problem at once, including every
component's options against its own registered dataclass."""

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
                "data.options.batchsize=3",
                "optim.lr=-1",
                "trainer.max_epochs=abc",
                "data.options.split=cpp",
                "model.options.hiden_size=8",
                "loss.name=lmhh",
            ],
        )
    errs = e.value.errors
    assert len(errs) == 6, errs
    text = "\n".join(errs)
    assert "data.options.batchsize: unknown key; did you mean 'batch_size'" in text
    assert "optim.lr: must be > 0.0, got -1" in text
    assert "trainer.max_epochs: expected int, got str 'abc'" in text
    assert "data.options.split: 'cpp' is not one of ['standard', 'cp']; did you mean 'cp'" in text
    assert "model.options.hiden_size: unknown key; did you mean 'hidden_size'" in text
    assert "loss.name: unknown loss 'lmhh'" in text and "bce" in text


def test_component_options_and_cross_field_checks_reported_together():
    with pytest.raises(ConfigError) as e:
        load_experiment(
            "default",
            [
                "callbacks=[{name: finite_loss_guard, options: {bogus: 1}}]",
                "loss.options.gamma=3",
                "model.options.hidden_size=100",
                "model.options.num_heads=8",
                "task.options.x=1",
            ],
        )
    text = "\n".join(e.value.errors)
    assert len(e.value.errors) == 4, text
    assert (
        "callbacks[0].options: callback 'finite_loss_guard' takes no options; got ['bogus']" in text
    )
    assert "loss.options: loss 'bce' takes no options; got ['gamma']" in text
    # The model's own cross-field check (ModelOptions.check) runs at validation time.
    assert "model.options: MCAN hidden_size (100) must be divisible by num_heads (8)" in text
    assert "task.options: task 'vqa' takes no options; got ['x']" in text


def test_a_mistyped_model_choice_names_the_field_and_the_allowed_values():
    """Model options declare their choices with ``Literal`` (one way); the message names the
    field and every allowed value."""
    with pytest.raises(ConfigError) as e:
        load_experiment(
            "uniter_mini_easy_vqa",
            ["model.options.language_init=minlm", "model.options.missing_boxes=zero"],
        )
    text = "\n".join(e.value.errors)
    assert len(e.value.errors) == 2, text
    assert (
        "model.options.language_init: expected one of 'random', 'minilm', got str 'minlm'" in text
    )
    assert "model.options.missing_boxes: expected one of 'error', 'zeros', got str 'zero'" in text


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.options.hidden_size=-5", "model.options.hidden_size: must be >= 1, got -5"),
        ("model.options.dropout=1.5", "model.options.dropout: must be < 1.0, got 1.5"),
        ("data.options.cp_leak=0.7", "data.options.cp_leak: must be < 0.5, got 0.7"),
        ("model.name=mcan_smal", "did you mean 'mcan_small'"),
        ("data.batch_size=3", "data.batch_size: unknown key; a component has only 'name' and"),
        ("callbacks=[{options: {}}]", "callbacks[0]: expected a mapping {name: <registered"),
        (
            "task.loss=ce",
            "task.loss: unknown key; a component has only 'name' and 'options' ('loss' is",
        ),
        ("model.name=[1]", "model.name: expected the name of a registered model, got [1]"),
        ("optim.lr_scale={encoder: -1}", "optim.lr_scale.encoder: -1 is not a positive number"),
        ("optim.lr_scale={encoder: abc}", "optim.lr_scale"),
        ("optim.lr_scale={'enc(': 0.1}", "optim.lr_scale: 'enc(' is not a regular expression"),
        ("optim.lr_scale={encoder:0.1}", "a missing space after the colon"),
    ],
)
def test_single_component_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        load_experiment("default", [override])
    assert expected in str(e.value)


def test_unknown_experiment_lists_available():
    with pytest.raises(ConfigError, match="Available in .*: .*default") as e:
        load_experiment("defualt")
    assert "Did you mean default" in str(e.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_experiment("default", ["trainer.max_epochs"])


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: mcan_small\n")
    with pytest.raises(ConfigError, match="cannot read .*bad.yaml"):
        load_experiment(str(bad))


def test_unknown_callback_named():
    with pytest.raises(ConfigError, match="unknown callback 'magnitude_prune'"):
        validate({"callbacks": [{"name": "magnitude_prune"}]})


def test_overrides_apply_and_types_build():
    cfg, _ = load_experiment(
        "default", ["trainer.max_epochs=2", "data.options.split=cp", "output_dir=/tmp/x"]
    )
    assert cfg.trainer.max_epochs == 2 and cfg.data.options["split"] == "cp"
    assert cfg.output_dir == "/tmp/x"
    assert cfg.model.options["visual_input"] == "grid"


def test_cli_exit_codes(capsys):
    assert main(["validate", "default"]) == 0
    assert main(["validate", "default", "data.options.batchsize=3", "foo=1"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "foo: unknown key" in err
    assert main(["train", "nope"]) == 2


def test_cli_lists_registered_components(capsys):
    assert main(["list", "components"]) == 0
    out = capsys.readouterr().out
    for name in ("mcan_small", "easy_vqa", "bce", "finite_loss_guard", "vqa"):
        assert name in out
    assert main(["list", "loss"]) == 0
    out = capsys.readouterr().out
    assert "ce" in out and "mcan_small" not in out


def test_overrides_reach_list_items():
    over = ["callbacks.0.name=finite_loss_guard", "trainer.max_epochs=2"]
    _, cfg = load_experiment("default", over)
    assert cfg.callbacks[0].name == "finite_loss_guard" and cfg.trainer.max_epochs == 2
    with pytest.raises(ConfigError, match="list index out of range"):
        load_experiment("default", ["callbacks.5.name=x"])
