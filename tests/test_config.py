import re
import typing
from dataclasses import fields

import pytest
import yaml

from hf_clipsel.configs import ClipselConfig, budget, flag_classes
from hf_clipsel.parser import parse_config


def test_budget_has_no_float_artefacts():
    assert 0.57 * 50000 < 28500  # the float product falls short...
    assert budget(0.57, 50000) == 28500  # ...the budget does not
    assert budget(0.3, 10) == 3
    assert budget(1, 7) == 7
    assert budget(0.999, 10) == 9


def test_yaml_sets_defaults_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"dataset_name": "some/data", "selection_ratios": [0.2, 0.4], "knn_k": 7}))
    config = parse_config(["--config", str(path), "--selection_ratios", "0.5", "0.3", "--alpha", "0.2"])
    assert config.data.dataset_name == "some/data"
    assert config.selection.selection_ratios == [0.3, 0.5]  # sorted
    assert config.selection.alpha == 0.2
    assert config.scoring.knn_k == 7


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"dataset_name": "x", "selection_ratio": 0.3}))
    with pytest.raises(ValueError, match="unknown configuration keys: selection_ratio"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_an_error(ratio):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        ClipselConfig.from_flat({"selection_ratios": [ratio]})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"adapter_preset": "lora"}, "adapter_preset='lora' is not valid"),
        ({"prompt_templates": ["a photo"]}, "exactly one"),
        ({"selection_ratios": []}, "selection_ratios is empty"),
        ({"batch_size": 64, "embedding_chunk_size": 100}, "multiple of batch_size"),
        ({"dtype": "float16"}, "dtype='float16' is not valid"),
    ],
)
def test_bad_values_say_how_to_fix_them(values, message):
    with pytest.raises(ValueError, match=message):
        ClipselConfig.from_flat(values)


@pytest.mark.parametrize(
    "text, message",
    [
        ("knn_k: five", "knn_k: 'five' is not a whole number"),
        ("selection_ratios: abc", "selection_ratios: 'abc' is not a number"),
        ("max_samples: 60.7", "max_samples: 60.7 is not a whole number or null"),
        ("batch_size: 16.5", "batch_size: 16.5 is not a whole number"),
        ("streaming: maybe", "streaming: 'maybe' is not true or false"),
        ("prompt_templates: a photo of a {}.", "prompt_templates: 'a photo of a {}.' is not a list"),
        ("knn_k: [5", "is not valid YAML at line 2, column 1"),
        ("selection_method: exactt", "selection_method='exactt' is not valid; choose one of ccs, clip_score, exact"),
        ("selection_method: sgd\nclass_balanced: true", "sgd does not support class_balanced"),
    ],
)
def test_a_bad_yaml_value_is_one_line_that_names_the_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        parse_config(["--config", str(path)])
    assert "\n" not in str(raised.value)


def test_flat_round_trip():
    config = ClipselConfig.from_flat({"dataset_name": "d", "alpha": None, "selection_ratios": [0.8, 0.1]})
    assert ClipselConfig.from_flat(config.to_flat()) == config


def test_a_saved_run_config_is_a_valid_config(tmp_path):
    from hf_clipsel.outputs import read_run_config, write_run_config

    config = ClipselConfig.from_flat({"dataset_name": "d", "selection_ratios": [0.4], "output_dir": str(tmp_path)})
    write_run_config(tmp_path, config.to_flat(), ["hf-clipsel", "run", "--selection_ratios", "0.4"])
    assert {"versions", "command"} <= set(read_run_config(tmp_path))
    assert parse_config(["--config", str(tmp_path / "run_config.yaml")]) == config


FLOAT_KEYS = sorted(
    name
    for klass in flag_classes()  # the stage groups and the selectors' own options
    for name, hint in typing.get_type_hints(klass).items()
    if name in {f.name for f in fields(klass) if f.init} and "float" in str(hint)
)


def test_the_float_settings_are_the_ones_checked_below():
    assert FLOAT_KEYS == [
        "adapter_check_confidence",
        "adapter_holdout_fraction",
        "adapter_learning_rate",
        "alpha",
        "beta",
        "damage_false_discovery",
        "damage_threshold",
        "lora_alpha",
        "lora_dropout",
        "selection_ratios",
        "sgd_learning_rate",
    ]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_setting_refuses_nan_and_infinity_naming_the_key(key, value):
    """Issue 24: `--alpha nan` made every reward NaN, `--beta nan` kept 0 rows, `--sgd_learning_rate inf` was taken."""
    with pytest.raises(ValueError, match=re.escape(key)) as raised:
        ClipselConfig.from_flat({key: [value] if key == "selection_ratios" else value})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("lora_alpha", 0.0),
        ("damage_threshold", 0.0),
        ("damage_false_discovery", 0.0),
        ("damage_false_discovery", 1.01),
    ],
)
def test_float_settings_outside_their_documented_range_are_refused(key, value):
    with pytest.raises(ValueError, match=re.escape(key)):
        ClipselConfig.from_flat({key: value})


@pytest.mark.parametrize(
    "args",
    [
        ["--alpha", "nan"],
        ["--beta", "nan"],
        ["--sgd_learning_rate", "inf"],
        ["--damage_threshold", "nan"],
        ["--adapter_learning_rate=-inf"],  # argparse reads a bare -inf as an option
        ["--lora_dropout", "nan"],
        ["--selection_ratios", "0.3", "nan"],
    ],
)
def test_nan_and_infinity_on_the_command_line_are_one_line_errors(args):
    key = args[0].removeprefix("--").split("=")[0]
    with pytest.raises(ValueError, match=rf"^{key}\b") as raised:
        parse_config(["--dataset_name", "d", *args])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "text", ["alpha: .nan", "adapter_learning_rate: .nan", "damage_threshold: .inf", "beta: -.inf", "lora_alpha: .nan"]
)
def test_nan_and_infinity_in_yaml_are_one_line_errors(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=rf"^{text.split(':')[0]}\b") as raised:
        parse_config(["--config", str(path)])
    assert "\n" not in str(raised.value)
