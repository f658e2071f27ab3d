"""Recipe validation: every mistake is one RecipeError naming file, field path and what is allowed."""
from __future__ import annotations

import pytest

from conftest import RECIPES
from qcompile.errors import RecipeError
from qcompile.recipe import build_passes, load_recipe, parse_recipe
from qcompile.registry import load_builtins_and_entry_points

load_builtins_and_entry_points()

BASE = {"passes": ["annotate", "calibrate", "insert_qdq"]}


def _error(data) -> str:
    with pytest.raises(RecipeError) as info:
        recipe = parse_recipe(data, "r.yaml")
        build_passes(recipe, "r.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("r.yaml: ")
    return message


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")))
def test_shipped_recipes_are_valid(path):
    passes = build_passes(load_recipe(path), str(path))
    assert [p.name for p in passes][-1] in ("insert_qdq", "fuse_requant")


def test_unknown_top_level_key_lists_allowed_keys():
    message = _error({**BASE, "quantisation": {}})
    assert "quantisation: unknown key" in message and "allowed: version, target, quantization" in message


def test_unknown_nested_key():
    message = _error({**BASE, "quantization": {"activations": {"calibrater": "max"}}})
    assert "quantization.activations.calibrater: unknown key" in message and "calibrator" in message


def test_bad_value_says_what_is_allowed():
    assert "quantization.weights.granularity: Input should be 'per_channel' or 'per_tensor'" in \
        _error({**BASE, "quantization": {"weights": {"granularity": "per_row"}}})


def test_unknown_calibrator_and_pass_suggest_names():
    assert "unknown calibrator 'maxx'" in _error({**BASE, "quantization": {"activations": {"calibrator": "maxx"}}})
    message = _error({"passes": ["annotate", "calibrat", "insert_qdq"]})
    assert "passes[1]: unknown pass 'calibrat'" in message and "did you mean 'calibrate'" in message


def test_pass_options_are_validated():
    message = _error({"passes": ["annotate", {"calibrate": {"samples": 3}}, "insert_qdq"]})
    assert "passes[1].calibrate.samples: unknown key" in message


def test_phase_order_and_requirements():
    message = _error({"passes": ["annotate", "calibrate", "insert_qdq", "annotate"]})
    assert "passes[3]: 'annotate' (annotate phase) cannot run after 'insert_qdq' (lower phase)" in message
    assert "add 'calibrate' before it" in _error({"passes": ["annotate", "insert_qdq"]})


def test_bad_regex_in_override():
    assert "quantization.overrides[0].match: not a valid regular expression" in \
        _error({**BASE, "quantization": {"overrides": [{"match": "conv[", "quantize": False}]}})


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("passes:\n  - annotate\n  bad: [\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: line \d+ not valid YAML"):
        load_recipe(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- annotate\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(path)
