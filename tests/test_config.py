"""Typed config: defaults valid, YAML + overrides, and one-line errors that name the key."""

from pathlib import Path

import pytest
import yaml

from unigrpo.config import (
    Config,
    ConfigError,
    builtin_configs,
    load_config,
    resolve_config_path,
    to_dict,
    validate,
)
from unigrpo.utils.typed_config import from_dict


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = validate(Config())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["algo.group_size=4", "sampler.window_range=[1, 4]", "algo.c_mse=1e-4",
                             "algo.adv_clip=null", "text.thinking=false", "optim.lr_text=2"])
    assert cfg.algo.group_size == 4
    assert cfg.sampler.window_range == (1, 4)
    assert cfg.algo.c_mse == pytest.approx(1e-4) and isinstance(cfg.algo.c_mse, float)
    assert cfg.algo.adv_clip is None and cfg.text.thinking is False
    assert isinstance(cfg.optim.lr_text, float)


@pytest.mark.parametrize("override, key", [
    ("algo.grup_size=4", "algo.grup_size"),             # unknown key
    ("algo.group_size=four", "algo.group_size"),        # wrong type
    ("algo.group_size=2.5", "algo.group_size"),         # float for int
    ("text.thinking=maybe", "text.thinking"),           # not a bool
    ("sampler.kind=euler", "sampler.kind"),             # not in Literal
    ("sampler.window_range=[1, 2, 3]", "sampler.window_range"),
    ("algo.group_size=1", "algo.group_size"),           # impossible: no group statistics
    ("sampler.window_size=6", "sampler.window_size"),   # window wider than its range
    ("sampler.window_range=[0, 12]", "sampler.window_range"),  # past the number of steps
    ("algo.trajectories_per_minibatch=7", "algo.trajectories_per_minibatch"),
    ("text.top_p=0", "text.top_p"),
    ("pretrain.wrong_reasoning_frac=1.5", "pretrain.wrong_reasoning_frac"),
    ("nosuch.key=1", "nosuch"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_window_larger_than_steps_is_rejected():
    with pytest.raises(ConfigError, match="sampler.window_range"):
        load_config(None, ["sampler.num_steps=3"])  # default range (0, 5) no longer fits


def test_ode_sampler_cannot_train_image_policy():
    with pytest.raises(ConfigError, match="sampler.kind"):
        load_config(None, ["sampler.kind=ode"])
    cfg = load_config(None, ["sampler.kind=ode", "algo.train_image=false"])
    assert cfg.sampler.kind == "ode"


def test_unknown_key_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean group_size"):
        from_dict(Config, {"algo": {"grup_size": 3}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [1, 2")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_reward_list_section():
    cfg = load_config(None, ["rewards=[{name: shapes, weight: 0.5}, {name: 'pkg.mod:fn', weight: 2}]"])
    assert [r.name for r in cfg.rewards] == ["shapes", "pkg.mod:fn"]
    with pytest.raises(ConfigError, match=r"rewards\[0\].wieght"):
        load_config(None, ["rewards=[{name: shapes, wieght: 1}]"])


def test_builtin_config_loads_the_packaged_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # independent of the working directory
    path = resolve_config_path("builtin:unigrpo")
    assert path.is_file() and path.name == "unigrpo.yaml" and path.parent.name == "configs"
    cfg = load_config("builtin:unigrpo", ["seed=7"])
    assert cfg == load_config(path, ["seed=7"]) and cfg.seed == 7
    assert cfg.output_dir == "runs/unigrpo"


def test_plain_paths_are_unchanged(tmp_path):
    assert resolve_config_path(tmp_path / "c.yaml") == tmp_path / "c.yaml"
    assert resolve_config_path("configs/x.yaml") == Path("configs/x.yaml")


def test_unknown_builtin_is_one_line_error_naming_the_available():
    with pytest.raises(ConfigError) as e:
        load_config("builtin:unigpro")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("builtin:unigpro")
    assert all(f"builtin:{name}" in msg for name in builtin_configs())


def test_builtin_descriptions_are_one_line():
    shipped = builtin_configs()
    assert {"demo", "unigrpo", "pretrain", "flowgrpo", "textgrpo"} <= set(shipped)
    assert all(d and "\n" not in d and not d.startswith("#") for d in shipped.values())


def test_sections_with_a_kind_pick_their_dataclass():
    """`task.kind` (and `model.kind`) select the section's dataclass, which checks the other keys."""
    from unigrpo.config import PromptsTaskConfig, ShapesTaskConfig

    assert isinstance(load_config(None, []).task, ShapesTaskConfig)
    cfg = load_config(None, ["task.kind=prompts", "task.prompts=p.jsonl"])
    assert isinstance(cfg.task, PromptsTaskConfig) and cfg.task.prompts == "p.jsonl"
    assert to_dict(cfg)["task"] == {"kind": "prompts", "prompts": "p.jsonl", "eval_prompts": None}
    with pytest.raises(ConfigError, match=r"^task.kind: must be one of 'shapes', 'prompts', got 'nope'$"):
        load_config(None, ["task.kind=nope"])
    with pytest.raises(ConfigError, match=r"^task.prompts: unknown key for task.kind='shapes'"):
        load_config(None, ["task.prompts=p.jsonl"])
    with pytest.raises(ConfigError, match=r"^model.kind: must be one of 'tiny', 'hf', 'bagel', got 'nope'$"):
        load_config(None, ["model.kind=nope"])
    with pytest.raises(ConfigError, match=r"^model.image_size: unknown key for model.kind='hf'"):
        load_config(None, ["model.kind=hf", "model.pipeline=p", "model.image_size=32"])


def test_every_model_kind_has_a_builder_and_a_config_section():
    import typing

    from unigrpo import config
    from unigrpo.models import KINDS
    from unigrpo.utils.typed_config import kind_of

    sections = typing.get_args(config.ModelConfig) or (config.ModelConfig,)
    assert set(KINDS) == {kind_of(s) for s in sections}
