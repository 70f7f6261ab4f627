"""Configs: command-line values coerced to the field types, the paper's defaults, a recipe's redeclared fields
keeping their validation, an unknown field listing the valid ones, and the JSON round trip."""
import json

import pytest

from helpers import ROOT
from thcore.config import ConfigError, from_dict, load_json
from thcore.recipe import configure
from thcore.tasks.translation import TranslationConfig

RECIPE = f"{ROOT}/recipes/single_translation.py"


def test_cli_values_are_coerced_to_field_types():
    cfg, _ = configure(RECIPE, {"lr": 1, "max_steps": 5.0, "activation_checkpointing": "True", "dropout": 0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.max_steps == 5 and isinstance(cfg.max_steps, int)
    assert cfg.activation_checkpointing is True and cfg.dropout == 0.0
    assert cfg.name == "single_translation" and cfg.run_dir == "runs/single_translation"
    with pytest.raises(ConfigError, match="max_steps=2.5: expected int"):
        configure(RECIPE, {"max_steps": 2.5})


def test_paper_defaults_and_seed_flags_exist():
    c = TranslationConfig()
    assert (c.d_model, c.num_heads, c.num_encoder_layers, c.num_decoder_layers, c.d_ff, c.dropout) == \
        (512, 8, 6, 6, 2048, 0.1)
    for f in ("epochs", "batch_size", "num_workers", "activation_checkpointing"):
        assert hasattr(c, f)


def test_recipe_redeclared_fields_keep_their_validation():
    """The demo recipe re-declares lr/batch_size with new defaults; the base validators must still apply."""
    with pytest.raises(ConfigError, match="lr=-1.0: must be > 0"):
        configure(RECIPE, {"lr": -1})
    with pytest.raises(ConfigError, match="batch_size=0: must be > 0"):
        configure(RECIPE, {"batch_size": 0})
    with pytest.raises(ConfigError, match="precision='fp8': must be one of 'fp32', 'bf16', 'fp16'"):
        configure(RECIPE, {"precision": "fp8"})


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        configure(RECIPE, {"num_head": 4})
    msg = str(e.value)
    assert "unknown config field 'num_head'" in msg and "did you mean 'num_heads'" in msg and "d_model" in msg
    assert "\n" not in msg


def test_json_round_trip(tmp_path):
    cfg, mod = configure(RECIPE, {"d_model": 64, "num_heads": 2})
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert load_json(mod.Config, str(path)) == cfg
    assert json.loads(path.read_text())["d_model"] == 64
    assert from_dict(mod.Config, {}, base=cfg) == cfg
