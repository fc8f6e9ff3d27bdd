"""Run configuration: recipe defaults, file + override layering, type and key checking."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deit.train.runconfig import TrainConfig, load_config, parse_override, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_deit_recipe() -> None:
    cfg = TrainConfig()
    assert cfg.optim.lr is None and cfg.optim.base_lr == 5e-4
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.betas == [0.9, 0.999]
    s = cfg.schedule
    assert (s.warmup_epochs, s.min_lr, s.warmup_lr) == (5, 1e-5, 1e-6)
    a = cfg.augment
    assert (a.label_smoothing, a.mixup, a.cutmix, a.mixup_switch_prob) == (0.1, 0.8, 1.0, 0.5)
    assert (a.random_erasing, a.repeated_aug, a.randaugment) == (0.25, 3, "rand-m9-mstd0.5-inc1")
    assert cfg.model.drop_path_rate == 0.1
    assert (cfg.distill.kind, cfg.distill.alpha, cfg.distill.tau) == ("none", 0.5, 1.0)
    assert cfg.run.ema is False and cfg.optim.clip_grad == 0.0


def test_file_then_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nlr = 1e-3\n[schedule]\nepochs = 7\n[data]\nmean = [0.5]\n")
    cfg = load_config(recipe, ["schedule.epochs=3", "run.ema=true", "distill.kind=none"])
    assert cfg.optim.lr == 1e-3  # from the file
    assert cfg.schedule.epochs == 3  # override wins
    assert cfg.run.ema is True and cfg.data.mean == [0.5]
    assert cfg.distill.kind == "none"  # a bare word is a string, even "none"


def test_values_are_parsed_and_coerced() -> None:
    cfg = load_config(
        None,
        [
            "optim.lr=1",
            "augment.scale=[0.5, 1]",
            "run.name=123",
            "model.embed_dim=none",
            "schedule.warmup_epochs=2",
        ],
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.augment.scale == [0.5, 1.0]
    assert cfg.run.name == "123"
    assert cfg.model.embed_dim is None
    assert parse_override("a.b = [1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize(
    ("override", "error", "names"),
    [
        ("optim.lrr=1", KeyError, "optim.lrr"),
        ("optimizer.lr=1", KeyError, "optimizer"),
        ("lr=1", KeyError, "lr"),
        ("schedule.epochs=1.5", TypeError, "schedule.epochs"),
        ("run.ema=maybe", TypeError, "run.ema"),
        ("augment.scale=[0.1, 'x']", TypeError, "augment.scale"),
        ("distill.kind=medium", ValueError, "distill.kind"),
        ("distill.kind=hard", ValueError, "distill.teacher"),
        ("run.precision=fp8", ValueError, "run.precision"),
    ],
)
def test_bad_values_name_the_key(override: str, error: type, names: str) -> None:
    with pytest.raises(error, match=re.escape(names)):
        load_config(None, [override])


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nmomentum = 0.9\n")
    with pytest.raises(KeyError, match=r"optim\.momentum"):
        load_config(recipe)


def test_broken_or_misshapen_recipe_names_the_file(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json must hold \[section\] tables, not a list"):
        load_config(listed)
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr = 1\n")
    with pytest.raises(ValueError, match=r"cannot parse .*broken\.toml"):
        load_config(broken)
    flat = tmp_path / "flat.toml"
    flat.write_text("lr = 1e-3\n")
    with pytest.raises(KeyError, match=r"flat\.toml.*'lr' must be a \[section\] table"):
        load_config(flat)


def test_wrong_type_override_reports_the_value_as_given() -> None:
    with pytest.raises(TypeError, match=r"schedule\.epochs") as info:
        load_config(None, ["schedule.epochs=1.5"])
    assert "'1.5'" not in str(info.value) and "1.5" in str(info.value)


def test_saved_json_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "distill.kind=soft", "distill.teacher=t.pt"])
    path = save_config(cfg, tmp_path / "config.json")
    assert load_config(path) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_resolved_notes_and_student_round_trip_and_set_keys_are_tracked(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.init=x", "optim.lr=3e-4"])
    assert cfg.explicit == {"model.init", "optim.lr"}
    cfg.student, cfg.notes = "fine-tuned from x (DeiT ...)", ["optim.layer_decay = 0.75: why"]
    path = save_config(cfg, tmp_path / "config.json")
    assert "explicit" not in path.read_text()
    again = load_config(path)
    assert again == cfg and again.notes == cfg.notes and again.student == cfg.student


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path: Path) -> None:
    cfg = load_config(path, ["distill.teacher=some/teacher"])
    assert cfg.schedule.epochs >= 1


def test_train_command_prints_config_errors_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deit.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nmomentum = 0.9\n")
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deit train: error: {recipe}: unknown config key 'optim.momentum'")
    assert len(err.splitlines()) == 1
