import pytest

from deepimage.config import ConfigError, TrainConfig, resolve_config, save_config


def test_defaults_follow_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.01, 0.9, 5e-4)
    assert cfg.schedule == "plateau" and cfg.gamma == 0.1
    assert cfg.precision == "auto" and cfg.channels_last == "auto"


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nepochs: 3\nmilestones: [1, 2]\n")
    cfg = resolve_config(path, {"epochs": 5})
    assert cfg.lr == 0.1 and cfg.epochs == 5 and cfg.milestones == [1, 2]


def test_int_is_accepted_for_float():
    assert resolve_config(None, {"lr": 1}).lr == 1.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("lrr: 0.1\n", "lrr"),
        ("lr: fast\n", "lr"),
        ("epochs: 2.5\n", "epochs"),
        ("precision: fp8\n", "precision"),
        ("channels_last: 1\n", "channels_last"),
        ("milestones: 3\n", "milestones"),
        ("crop: 300\n", "crop"),
        ("batch_size: 10\naccum_steps: 3\n", "accum_steps"),
        ("val_split: 1.5\n", "val_split"),
    ],
)
def test_bad_key_or_value_is_one_line_naming_the_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve_config(path)
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        resolve_config(None, {"epoch": 3})


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        resolve_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config(None, {"lr": 0.02, "milestones": [3], "max_steps": 7})
    save_config(cfg, tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml") == cfg


def test_linear_scaling_rule():
    cfg = resolve_config(None, {"lr": 0.1, "batch_size": 512, "lr_scaling": "linear"})
    assert cfg.effective_lr() == pytest.approx(0.2)


def test_adamw_needs_ddp_sync():
    assert resolve_config(None, {"optimizer": "adamw", "sync": "ddp"}).optimizer == "adamw"
    with pytest.raises(ConfigError, match="'optimizer'"):
        resolve_config(None, {"optimizer": "adamw", "sync": "lazy"})


def test_precedence_flags_over_file_over_resumed_run(tmp_path, caplog):
    """A resumed run's saved keys replace defaults and ``base``; the file and flags override
    them, and the keys they change are named in a warning."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(resolve_config(None, {"lr": 0.02, "epochs": 4, "seed": 5}), run / "config.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 6\nseed: 5\n")
    base = {"lr": 0.3, "momentum": 0.5}
    cfg = resolve_config(path, {"epochs": 9}, resumed=run, base=base)
    assert (cfg.lr, cfg.momentum, cfg.epochs, cfg.seed) == (0.02, 0.9, 9, 5)
    assert "changed keys: epochs" in caplog.text
    fresh = resolve_config(path, {"seed": 1}, resumed=tmp_path / "none", base=base)
    assert (fresh.lr, fresh.momentum, fresh.epochs, fresh.seed) == (0.3, 0.5, 6, 1)
