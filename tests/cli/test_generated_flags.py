"""`llmclf train`'s flags are generated from the config dataclasses (#19): every field has a flag named as
before, its help is the field's docstring, its default the dataclass default, grouped by section; a flag
not given leaves the YAML file's or preset's value alone."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from llmclf.cli.flags import YAML_ONLY, train_flags
from llmclf.cli.parser import build_parser, name_flags, train_overrides
from llmclf.config import CONFIG_SECTIONS, RunConfig, build_config, field_docs, load_config

# The flags of the hand-typed table this replaced: users' scripts rely on these names.
FLAGS_BEFORE = """--data --text-column --label-column --eval-data --train-per-class --val-per-class --test-per-class
--val-fraction --test-fraction --max-length --model --quantize --precision --attn-implementation --lora-r
--lora-alpha --lora-dropout --lora-targets --lora-layers --epochs --lr --batch-size --eval-batch-size
--step-tokens --weight-decay --class-weights --seed --lr-scheduler --warmup-ratio --head-init --lexical
--activation-cache --report-to --save-steps --eval-steps --early-stopping-patience --output --drop-invalid
--trust-remote-code --gradient-checkpointing --allow-pickle --keep-checkpoint --bf16 --fp16 --config
--preset --overwrite --resume""".split()


def train_parser():
    return next(a for a in build_parser()._actions if a.dest == "command").choices["train"]


def config_fields() -> list[tuple[str, dataclasses.Field, str]]:
    """(key, field, docstring) of every config field, read here independently of the generator."""
    out = []
    for section, cls in CONFIG_SECTIONS.items():
        out += [(f"{section}.{f.name}", f, field_docs(cls)[f.name]) for f in dataclasses.fields(cls)]
    top = [f for f in dataclasses.fields(RunConfig) if f.name not in CONFIG_SECTIONS]
    return out + [(f.name, f, field_docs(RunConfig)[f.name]) for f in top]


def rendered_help(monkeypatch) -> dict[str, str]:
    """`llmclf train --help` as argparse prints it, one entry per flag: first option string → help."""
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: a help is one line, defaults expanded
    helps: dict[str, str] = {}
    current = None
    for line in train_parser().format_help().splitlines():
        entry = re.match(r"  (-[^ ,]+)(?:, [^ ]+)*(?: \S+)?(?:  +(.*))?$", line)
        if entry:
            current, helps[entry.group(1)] = entry.group(1), entry.group(2) or ""
        elif current and line.startswith("    "):
            helps[current] = (helps[current] + " " + line.strip()).strip()
        else:
            current = None
    return helps


def first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s", " ".join(text.split()), maxsplit=1)[0]


def test_every_config_field_has_a_flag_or_a_reason():
    dests = {a.dest: a for a in train_parser()._actions}
    for key, _, _ in config_fields():
        if key in YAML_ONLY:
            assert YAML_ONLY[key].strip(), key
            assert key not in dests, key
        else:
            assert key in dests and dests[key].option_strings, key
    assert set(YAML_ONLY) <= {key for key, _, _ in config_fields()}


def test_todays_flag_names_are_kept():
    options = {o for a in train_parser()._actions for o in a.option_strings}
    assert set(FLAGS_BEFORE) <= options, set(FLAGS_BEFORE) - options
    by_key = {f.key: f.flag for f in train_flags()}
    assert (by_key["data.path"], by_key["model.name"], by_key["lora.r"], by_key["train.lr"]) == (
        "--data",
        "--model",
        "--lora-r",
        "--lr",
    )


def test_help_is_the_docstring_and_defaults_are_the_dataclasses(monkeypatch):
    actions: dict = {}
    for a in train_parser()._actions:  # --precision, not its shortcuts --bf16/--fp16 of the same dest
        actions.setdefault(a.dest, a)
    flag_of = {dest: a.option_strings[0] for dest, a in actions.items() if a.option_strings}
    helps = rendered_help(monkeypatch)
    for key, fld, doc in config_fields():
        action = actions[key]
        assert action.default == fld.default, key  # the parser's default is the dataclass's
        text = helps[action.option_strings[0]]
        # config keys the docstring mentions read as their flags on the command line
        expected = re.sub(r"\b[a-z]+\.[a-z_]+\b", lambda m: flag_of.get(m.group(0), m.group(0)), doc)
        assert first_sentence(doc) and text.startswith(first_sentence(expected)), (key, text)
        assert " ".join(expected.split()) in text, (key, text)
        if fld.default is None:
            assert "(default" not in text, (key, text)
        else:
            assert text.endswith(f"(default {fld.default})"), (key, text)
    assert (
        helps["--eval-steps"].count("--save-steps") == 1 and "train.save_steps" not in helps["--eval-steps"]
    )
    assert helps["--lr"] == "Peak learning rate (the recipe: 1e-4). (default 0.0005)"


def test_flags_are_grouped_by_config_section_with_its_docstring(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")
    groups = {g.title: g for g in train_parser()._action_groups}
    sections = {"data": "data", "model": "model", "LoRA": "lora", "training": "train"}
    for title, section in sections.items():
        assert groups[title].description == " ".join(CONFIG_SECTIONS[section].__doc__.split())
        dests = {a.dest for a in groups[title]._group_actions}
        assert {f"{section}.{f.name}" for f in dataclasses.fields(CONFIG_SECTIONS[section])} <= dests
        assert all(d.startswith(f"{section}.") for d in dests), dests
    assert {a.dest for a in groups["task and output"]._group_actions} == {"task", "output", "overwrite", "resume"}
    text = train_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in ("data", "model", "LoRA", "training", "task and output")]
    assert positions == sorted(positions)
    assert "\ndata:\n  Where the labelled texts come from and how they are split.\n" in text


def sample(flag) -> tuple[list[str], object]:
    """Arguments that give `flag` a value other than its default, and the value parsed."""
    if flag.kind is bool:
        return ([f"--no-{flag.flag[2:]}"], False) if flag.default else ([flag.flag], True)
    if flag.choices:
        value = next(c for c in reversed(flag.choices) if c != flag.default)
        return [flag.flag, value], value
    if flag.kind in (int, float):
        return [flag.flag, "3"], flag.kind(3)
    if flag.kind is str:
        return [flag.flag, "x_y"], "x_y"
    return [flag.flag, "7"], 7  # number_or_words(int, ...)


@pytest.mark.parametrize("flag", train_flags(), ids=lambda f: f.flag)
def test_each_flag_overrides_its_own_key_only(flag):
    argv, value = sample(flag)
    overrides = train_overrides(build_parser().parse_args(["train", *argv]))
    assert overrides == ({flag.section: {flag.name: value}} if flag.section else {flag.name: value})


def test_flags_not_given_leave_yaml_and_preset_alone(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "preset": "recipe",
                "data": {"drop_invalid": True, "max_length": 64},
                "model": {"precision": "fp32"},
                "train": {"lr": 3e-3, "keep_checkpoint": True},
                "output": "runs/from-yaml",
            }
        )
    )
    args = build_parser().parse_args(["train", "--config", str(path)])
    assert train_overrides(args) == {}
    config = load_config(args.config, train_overrides(args))
    assert (config.train.lr, config.train.batch_size, config.lora.layers) == (3e-3, 8, None)  # file, preset
    assert (config.data.drop_invalid, config.data.max_length, config.output) == (True, 64, "runs/from-yaml")
    assert config.model.precision == "fp32" and config.train.keep_checkpoint is True

    # A flag given with the default's value still wins over the file and the preset.
    argv = ["--lr", "5e-4", "--no-drop-invalid", "--lora-layers", "auto", "--bf16", "--output", "runs/latest"]
    args = build_parser().parse_args(["train", "--config", str(path), *argv])
    config = load_config(args.config, train_overrides(args))
    assert (config.train.lr, config.data.drop_invalid, config.lora.layers) == (5e-4, False, "auto")
    assert (config.model.precision, config.output, config.data.max_length) == ("bf16", "runs/latest", 64)
    assert config.train.batch_size == 8  # not given: the preset's


def test_no_flags_is_the_default_config():
    args = build_parser().parse_args(["train"])
    assert build_config(train_overrides(args)) == RunConfig()


def test_config_errors_name_the_flag():
    with pytest.raises(Exception) as err:
        build_config({"lora": {"r": 0}})
    assert name_flags(str(err.value)).endswith("(flag --lora-r, or key lora.r in the --config file).")
    with pytest.raises(Exception) as err:
        build_config({"train": {"eval_batch_size": 0}})
    assert "(flag --eval-batch-size, or key train.eval_batch_size" in name_flags(str(err.value))


def test_bad_values_are_usage_errors_with_the_flag_name(capsys):
    for argv, needle in [
        (["--lora-layers", "some"], "argument --lora-layers: expected a whole number, auto or all"),
        (["--epochs", "many"], "argument --epochs: expected a number or auto, found 'many'"),
        (["--quantize", "8bit"], "argument --quantize: invalid choice: '8bit'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["train", *argv])
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_field_docs_reads_attribute_docstrings():
    @dataclasses.dataclass
    class Example:
        """Not a field's."""

        documented: int = 1
        """First line.

        Second paragraph."""
        bare: str = "x"
        after: float = 0.5
        """Below `after`."""

    assert field_docs(Example) == {
        "documented": "First line.\n\nSecond paragraph.",
        "after": "Below `after`.",
    }
    for _, _, doc in config_fields():
        assert doc.strip() and "\n    " not in doc  # every field documented, indentation cleaned
