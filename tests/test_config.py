import pytest
import yaml

from llmclf.cli.parser import build_parser, train_overrides
from llmclf.config import build_config, load_config
from llmclf.errors import LlmclfError
from llmclf.runfolder import CONFIG, RunFolder


def test_recipe_preset_is_the_recipe():
    c = build_config({"preset": "recipe"})
    assert (c.train.lr, c.train.batch_size, c.train.epochs, c.train.weight_decay) == (1e-4, 8, 1.0, 0.01)
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.targets, c.lora.layers) == (
        16,
        8,
        0.05,
        "auto",
        None,
    )
    assert c.train.head_init == "random" and c.train.warmup_ratio == 0.0
    assert c.model.name == "smollm2-135m" and c.model.quantize == "auto"
    assert c.train.class_weights == "auto"


def test_yaml_overlay_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": "a.csv", "train_per_class": 10},
                "train": {"lr": 5e-4, "epochs": 3},
                "output": "runs/x",
            }
        )
    )
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--lr", "2e-4", "--lora-targets", "q_proj,v_proj"]
    )
    c = load_config(args.config, train_overrides(args))
    assert c.train.lr == 2e-4  # flag wins
    assert c.train.epochs == 3  # from the file
    assert c.data.train_per_class == 10 and c.data.path == "a.csv" and c.output == "runs/x"
    assert c.lora.targets == ["q_proj", "v_proj"]
    assert c.train.batch_size == 16  # default


@pytest.mark.parametrize(
    ("overlay", "needle"),
    [
        ({"model": {"quantize": "8bit"}}, "model.quantize='8bit'"),
        ({"train": {"lr": -1}}, "train.lr=-1"),
        ({"train": {"class_weights": "balanced"}}, "auto, none"),
        ({"data": {"train_per_class": 0}}, "data.train_per_class=0"),
        ({"data": {"test_per_class": 5}}, "need data.train_per_class"),
        ({"lora": {"rank": 8}}, "Unknown key(s) ['rank'] in config section 'lora'"),
        ({"trainer": {}}, "Unknown config section(s) ['trainer']"),
    ],
)
def test_invalid_values_name_the_key_and_the_allowed_values(overlay, needle):
    with pytest.raises(LlmclfError) as err:
        build_config(overlay)
    assert needle in str(err.value)


def test_saved_config_round_trips(tmp_path):
    c = build_config({"data": {"path": "x.csv", "val_per_class": 2, "train_per_class": 3}, "lora": {"r": 4}})
    run = RunFolder(tmp_path)
    run.write_text(CONFIG, c.to_yaml())
    assert run.config() == c


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(LlmclfError, match="Config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_quiet_and_verbose_work_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["--quiet", "train"]).quiet and parser.parse_args(["train", "--quiet"]).quiet
    assert not parser.parse_args(["train"]).quiet
    assert parser.parse_args(["predict", "run", "--text", "x", "--verbose"]).verbose


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_inference_sizes_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["predict", "run", "--text", "x", "--batch-size", value])
    assert exit_info.value.code == 2 and "whole number > 0" in capsys.readouterr().err


def test_recipe_preset_sits_under_yaml_and_flags(tmp_path):
    from llmclf.cli.parser import build_parser, train_overrides
    from llmclf.config import PRESETS

    recipe = build_config({"preset": "recipe"})
    for section, values in PRESETS["recipe"].items():
        for key, value in values.items():
            assert getattr(getattr(recipe, section), key) == (None if value == "all" else value)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: recipe\ntrain: {lr: 0.003}\n", encoding="utf-8")
    args = build_parser().parse_args(["train", "--config", str(yaml_file), "--epochs", "3"])
    config = load_config(args.config, train_overrides(args))
    assert (config.train.lr, config.train.epochs, config.lora.alpha) == (0.003, 3.0, 8)
    args = build_parser().parse_args(["train", "--preset", "recipe"])
    assert load_config(None, train_overrides(args)).train.batch_size == 8
    with pytest.raises(LlmclfError, match="preset='fast'.*recipe"):
        build_config({"preset": "fast"})
