"""Config system and CLI: presets, file + overrides, round trip, help, and early errors before any model loads."""

import json
import subprocess
import sys

import pytest

from spo_fast.config import PRESETS, SPOConfig, config_from_dict, config_hash, config_to_dict, make_config
from spo_fast.train import main, parse


def test_presets_resolve_and_round_trip(tmp_path):
    for name in PRESETS:
        cfg = make_config(name)
        d = config_to_dict(cfg)
        assert config_from_dict(d) == cfg
        assert config_hash(config_from_dict(json.loads(json.dumps(d)))) == config_hash(cfg)
    sd15, sdxl = make_config("sd15"), make_config("sdxl")
    assert (sd15.model.lora_rank, sd15.train.lr, sd15.sampling.num_candidates, sd15.sampling.threshold) == (
        4,
        6e-5,
        4,
        0.3,
    )
    assert (sdxl.model.lora_rank, sdxl.train.lr, sdxl.sampling.inner_steps, sdxl.train.grad_accum) == (64, 1e-5, 3, 2)


def test_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 0.001\n  batch_size: 3\nsampling:\n  num_candidates: 6\n")
    _, cfg = parse(["--config", str(f), "--train.lr", "0.5", "--model.lora_targets", "to_q,to_v"])
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 3 and cfg.sampling.num_candidates == 6
    assert cfg.model.lora_targets == ["to_q", "to_v"]
    j = tmp_path / "run.json"
    j.write_text(json.dumps(config_to_dict(cfg)))
    _, again = parse(["--config", str(j)])
    assert again == cfg


def test_unknown_keys_list_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--train.lrr", "1"])
    assert "valid config keys" in capsys.readouterr().err
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"train": {"nope": 1}}))
    with pytest.raises(ValueError, match="unknown config key 'train.nope'.*train.lr"):
        make_config("toy", f)
    with pytest.raises(ValueError, match="expects a int"):
        make_config("toy", overrides={"train.batch_size": "many"})


def test_print_config(capsys):
    assert main(["--print-config", "--sampling.num_candidates", "3"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["sampling"]["num_candidates"] == 3 and d["preset"] == "toy"


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sampling.num_candidates", "1"], "k"),
        (["--sampling.divert_step", "20"], "divert_step"),
        (["--sampling.threshold", "1.0"], "threshold"),
        (["--sampling.threshold", "-0.1"], "threshold"),
        (["--train.method", "ppo"], "method"),
        (["--preference.kind", "step_aware"], "checkpoint"),
        (["--preference.head", "missing_head.pt"], "python -m spo_fast.train_head"),
        (["--preference.verify_head", "true"], "--preference.head <head.pt>"),
        (["--preference.head_max_timestep", "500"], "--preference.head <head.pt>"),
        (["--preference.head_max_timestep", "-1"], "head_max_timestep must be >= 0"),
    ],
)
def test_bad_config_fails_before_loading_models(tmp_path, capsys, monkeypatch, args, match):
    import spo_fast.trainer as trainer

    def boom(*a, **k):  # any model load would be a failure of the early checks
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(trainer, "load_components", boom)
    assert main([*args, "--log.output_dir", str(tmp_path / "run")]) == 2
    assert match in capsys.readouterr().err


def test_empty_prompt_file_fails_early(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("\n\n")
    assert main(["--data.prompts", str(f), "--log.output_dir", str(tmp_path / "run")]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_help_lists_every_key():
    out = subprocess.run(
        [sys.executable, "-m", "spo_fast.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for sec in ("model", "sampling", "train", "log"):
        for key in config_to_dict(SPOConfig())[sec]:
            assert f"--{sec}.{key}" in out
    assert "option_strings" not in out, "a '%' in a help line was formatted by argparse"
    assert "~30% slower" in " ".join(out.split())


def test_train_head_cli_help_and_print_config():
    out = subprocess.run(
        [sys.executable, "-m", "spo_fast.train_head", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--train.lr" in out and "option_strings" not in out
    cfg = subprocess.run(
        [sys.executable, "-m", "spo_fast.train_head", "--print-config", "--train.lr", "0.01"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert json.loads(cfg)["train"]["lr"] == 0.01
