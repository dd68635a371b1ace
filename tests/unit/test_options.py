"""Every option is declared once (trillm.options); the CLI, the rendered configs, the parsers and README agree."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from trillm import cli
from trillm.engine.config import EngineConfig
from trillm.options import (
    BY_NAME,
    ENGINE_OPTIONS,
    EVERY_MODEL,
    OPTIONS,
    POSTPROCESSING,
    PREPROCESSING,
    REQUIRED,
    TENSORRT_LLM,
    Option,
    markdown_table,
    model_options,
    readme_section,
    with_readme_section,
)
from trillm.serve import SERVE_OPTIONS, ServeConfig
from trillm.templates import render_repository
from trillm.triton.engine_host import EngineHostParams
from trillm.triton.errors import ConfigError
from trillm.triton.params import parse_parameters
from trillm.versions import VERSION_PLACEHOLDER

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    cli._serve_args(parser)
    return parser


def other_value(option: Option) -> object:
    """A value of ``option`` that is not its default and follows its rule."""
    if option.choices:
        return next(c for c in reversed(option.choices) if c != option.default)
    if option.kind is bool:
        return not option.default
    if option.kind is int:
        return (option.minimum or 0) + 3
    return "/elsewhere"


def fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    (path / "tokenizer.json").write_text("{}")
    return path


def rendered_parameters(config_pbtxt: Path) -> dict[str, str]:
    """A rendered config.pbtxt's parameters, by key."""
    return dict(re.findall(r'key: "(\w+)"\n  value: \{ string_value: "([^"]*)" \}', config_pbtxt.read_text()))


def as_model_config(name: str, parameters: dict[str, str]) -> dict:
    return {"name": name, "parameters": {k: {"string_value": v} for k, v in parameters.items()}}


# -- README ---------------------------------------------------------------------------

def test_readme_table_is_the_generated_one():
    assert readme_section((ROOT / "README.md").read_text()) == markdown_table(), (
        "README's table of options is stale: run `python -m trillm.options --write-readme`"
    )


def test_write_readme_replaces_only_the_section():
    readme = (ROOT / "README.md").read_text()
    stale = readme.replace("| tokens per KV block |", "| old words |")
    assert stale != readme and with_readme_section(stale) == readme
    with pytest.raises(ValueError, match="no options section"):
        readme_section("# no markers here\n")


def test_every_option_has_a_readme_row():
    rows = markdown_table().splitlines()[2:]
    assert [re.match(r"\| `(\w+)`", row).group(1) for row in rows] == [o.name for o in OPTIONS]


# -- the command line -----------------------------------------------------------------

def test_flags_keep_their_names_and_defaults():
    defaults = vars(serve_parser().parse_args([]))
    flags = {o.name: o.flag_name for o in OPTIONS if o.flag_name}
    assert flags == {
        "checkpoint_dir": "--checkpoint", "tokenizer_dir": "--tokenizer", "engine_kind": "--engine",
        "engine_dir": "--engine-dir", "dtype": "--dtype", "quantization": "--quantization",
        "quant_group_size": "--quant-group-size", "max_model_len": "--max-model-len",
        "max_input_len": "--max-input-len", "max_num_seqs": "--max-num-seqs",
        "max_num_batched_tokens": "--max-num-batched-tokens", "kv_cache_blocks": "--kv-cache-blocks",
        "block_size": "--block-size", "num_threads": "--num-threads", "enable_prefix_caching": "--no-prefix-caching",
        "default_exclude_input_in_output": "--echo-prompt", "max_batch_size": "--max-batch-size",
    }
    for name in flags:
        option = BY_NAME[name]
        assert defaults[name] == (None if option.kind is Path else option.default), name
    d = ServeConfig(checkpoint_dir=Path("."))
    assert all(defaults[o.name] == getattr(d, o.name) for o in SERVE_OPTIONS if o.flag_name)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.flag_name], ids=lambda o: o.name)
def test_each_flag_sets_its_option(option):
    value = other_value(option)
    argv = [option.flag_name] if option.kind is bool else [option.flag_name, str(value)]
    parsed = getattr(serve_parser().parse_args(argv), option.name)
    assert parsed == (Path(value) if option.kind is Path else value)


@pytest.mark.parametrize("argv,message", [
    (["--block-size", "0"], "must be an integer in [1, 1024], got 0"),
    (["--max-num-seqs", "-1"], "must be an integer >= 0 (0 = derive), got -1"),
    (["--num-threads", "1.5"], "must be an integer >= 0 (0 = derive), got '1.5'"),
    (["--max-batch-size", "0"], "must be an integer >= 1, got 0"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--quant-group-size", "48"], "invalid choice: 48"),
])
def test_a_flag_breaking_its_rule_is_refused_with_the_rule(argv, message):
    with pytest.raises(argparse.ArgumentError) as info:
        serve_parser().parse_args(argv)
    assert message in str(info.value)


# -- dataclasses ------------------------------------------------------------------------

def defaults_of(cls) -> dict[str, object]:
    return {f.name: (REQUIRED if f.default is dataclasses.MISSING else f.default) for f in dataclasses.fields(cls)}


def test_engine_host_params_are_the_tensorrt_llm_options():
    assert defaults_of(EngineHostParams) == {o.name: o.default for o in model_options(TENSORRT_LLM)}


def test_engine_config_is_the_checkpoint_and_the_engine_options():
    assert defaults_of(EngineConfig) == {"checkpoint_dir": REQUIRED, **{o.name: o.default for o in ENGINE_OPTIONS}}
    assert set(defaults_of(EngineConfig)) <= set(defaults_of(EngineHostParams)), "the host passes every one on"


def test_serve_config_has_every_option():
    fields = defaults_of(ServeConfig)
    assert all(o.name in fields for o in OPTIONS)
    assert all(fields[o.name] == o.default for o in SERVE_OPTIONS)


@pytest.mark.parametrize("changes,message", [
    ({"dtype": "int8"}, "dtype: must be one of ('auto', 'float32', 'bfloat16', 'float16'), got 'int8'"),
    ({"max_num_seqs": -1}, "max_num_seqs: must be an integer >= 0 (0 = derive), got -1"),
    ({"num_threads": 1.5}, "num_threads: must be an integer >= 0 (0 = derive), got 1.5"),
    ({"block_size": 0}, "block_size: must be an integer in [1, 1024], got 0"),
    ({"enable_prefix_caching": "yes"}, "enable_prefix_caching: must be a bool, got 'yes'"),
    ({"quantization": "fp8"}, "quantization: must be one of ('none', 'int8', 'int4'), got 'fp8'"),
    ({"quant_group_size": True}, "quant_group_size: must be one of (32, 64, 128), got True"),
])
def test_engine_config_keeps_its_messages(tmp_path, changes, message):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError) as info:
        EngineConfig(checkpoint_dir=str(tmp_path), **changes).validate()
    assert str(info.value) == message


# -- config.pbtxt and its parser ---------------------------------------------------------

@pytest.mark.parametrize("model", [TENSORRT_LLM, PREPROCESSING, POSTPROCESSING])
def test_each_rendered_config_takes_the_options_that_name_it(tmp_path, model):
    config = ServeConfig(checkpoint_dir=fake_checkpoint(tmp_path / "c"), model_repository=REPOSITORY,
                         work_dir=tmp_path / "w")
    render_repository(REPOSITORY, tmp_path / "r", config.template_values())
    assert set(rendered_parameters(tmp_path / "r" / model / "config.pbtxt")) == {o.name for o in model_options(model)}
    assert f"max_batch_size: {config.max_batch_size}" in (tmp_path / "r" / model / "config.pbtxt").read_text()
    assert model_options(EVERY_MODEL) == (BY_NAME["max_batch_size"],)


def test_every_flag_reaches_the_engine_host_through_the_rendered_config(tmp_path, monkeypatch):
    """trillm render's flags -> ServeConfig -> tensorrt_llm/config.pbtxt -> EngineHostParams, for every option."""
    monkeypatch.delenv("TRILLM_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TRILLM_ADMIN_KEY_FILE", raising=False)
    checkpoint, tokenizer = fake_checkpoint(tmp_path / "c"), fake_checkpoint(tmp_path / "t")
    chosen = {o.name: other_value(o) for o in OPTIONS if o.flag_name and o.kind is not Path}
    argv = ["--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--model-repository", str(REPOSITORY),
            "--work-dir", str(tmp_path / "w")]
    for name, value in chosen.items():
        option = BY_NAME[name]
        argv += [option.flag_name] if option.kind is bool else [option.flag_name, str(value)]
    config = cli._config(serve_parser().parse_args(argv))
    render_repository(REPOSITORY, tmp_path / "r", config.template_values())
    raw = rendered_parameters(tmp_path / "r" / TENSORRT_LLM / "config.pbtxt")
    params = parse_parameters(as_model_config(TENSORRT_LLM, raw), EngineHostParams)
    expected = {**{k: v for k, v in chosen.items() if k in raw},
                "checkpoint_dir": str(checkpoint.resolve()), "tokenizer_dir": str(tokenizer.resolve())}
    assert {name: getattr(params, name) for name in expected} == expected
    assert all(getattr(params, o.name) == o.default for o in model_options(TENSORRT_LLM) if o.name not in expected)


@pytest.mark.parametrize("name,raw,message", [
    ("dtype", "int8", "parameter 'dtype': must be one of ('auto', 'float32', 'bfloat16', 'float16'), got 'int8'"),
    ("block_size", "0", "parameter 'block_size': must be an integer in [1, 1024], got 0"),
    ("max_num_seqs", "-2", "parameter 'max_num_seqs': must be an integer >= 0 (0 = derive), got -2"),
    ("engine_kind", "onnx", "parameter 'engine_kind': must be one of ('torch', 'tensorrt_llm'), got 'onnx'"),
    ("kv_cache_blocks", "lots", "parameter 'kv_cache_blocks': expected int, got 'lots'"),
])
def test_the_parser_names_the_parameter_and_its_rule(name, raw, message):
    with pytest.raises(ConfigError) as info:
        parse_parameters(as_model_config(TENSORRT_LLM, {"checkpoint_dir": "/c", name: raw}), EngineHostParams)
    assert str(info.value) == message


def test_per_version_placeholders_are_the_per_version_options():
    per_version = {o.name for o in OPTIONS if o.per_version}
    assert per_version == {"checkpoint_dir", "tokenizer_dir"}
    assert all(VERSION_PLACEHOLDER.match(f"{name}_v2").group(1) == name for name in per_version)
    assert VERSION_PLACEHOLDER.match("dtype_v2") is None
