"""Config rendering and parameter parsing fail loudly (no server)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from trillm.templates import TemplateError, fill, render_repository
from trillm.triton.errors import ConfigError
from trillm.triton.io import from_word_list, stack_word_lists, to_word_list
from trillm.triton.params import parse_parameters

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_fill_replaces_every_placeholder():
    assert fill("a ${x} b ${y} ${x}", {"x": 1, "y": "two"}) == "a 1 b two 1"


def test_fill_refuses_an_unfilled_placeholder():
    with pytest.raises(TemplateError, match="y"):
        fill("${x} ${y}", {"x": 1})


def _repo(tmp_path: Path) -> Path:
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "m"\nmax_batch_size: ${mbs}\n')
    (model / "1" / "model.py").write_text("x = 1\n")
    return tmp_path / "repo"


def test_render_repository_copies_and_fills(tmp_path):
    out = tmp_path / "out"
    render_repository(_repo(tmp_path), out, {"mbs": 8})
    assert (out / "m" / "config.pbtxt").read_text() == 'name: "m"\nmax_batch_size: 8\n'
    assert (out / "m" / "1" / "model.py").exists()


def test_render_repository_refuses_an_unknown_value(tmp_path):
    with pytest.raises(TemplateError, match="mbz"):
        render_repository(_repo(tmp_path), tmp_path / "out", {"mbs": 8, "mbz": 9})


def test_shipped_repository_renders_with_the_serve_values(tmp_path, demo_model_dir):
    from trillm.serve import ServeConfig

    config = ServeConfig(checkpoint_dir=demo_model_dir, model_repository=ROOT / "model_repository", work_dir=tmp_path)
    rendered = render_repository(config.model_repository, tmp_path / "r", config.template_values())
    assert {p.parent.name for p in rendered} == {
        "preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls"
    }
    for path in rendered:
        assert "${" not in path.read_text()


@dataclass
class _Params:
    path: str
    count: int = 1
    flag: bool = False
    ratio: float = 0.5


def _config(**params) -> str:
    return json.dumps({"name": "m", "parameters": {k: {"string_value": v} for k, v in params.items()}})


def test_parameters_are_typed():
    p = parse_parameters(_config(path="/x", count="3", flag="true", ratio="0.25"), _Params)
    assert (p.path, p.count, p.flag, p.ratio) == ("/x", 3, True, 0.25)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"path": "/x", "cuont": "3"}, "cuont"),
        ({"count": "3"}, "path"),
        ({"path": "/x", "count": "three"}, "count"),
        ({"path": "/x", "flag": "maybe"}, "flag"),
    ],
)
def test_bad_parameters_fail_loudly(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_parameters(_config(**params), _Params)


def test_word_list_round_trip():
    words = [[5, 6], [7], [8, 9, 10]]
    array = to_word_list(words)
    assert array.tolist() == [[5, 6, 7, 8, 9, 10], [2, 3, 6, -1, -1, -1]]
    assert from_word_list(array) == words
    assert from_word_list(to_word_list([])) == []
    batch = stack_word_lists([to_word_list([[1]]), to_word_list(words)])
    assert batch.shape == (2, 2, 6) and from_word_list(batch[0]) == [[1]]
    assert np.all(batch[0, 1, 1:] == -1)
