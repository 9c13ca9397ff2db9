"""Sweep: a 3-trial study on the bundled sample completes, a second invocation continues it (and prunes),
and the best trial's experiment file trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import FAST_TRAIN, compose, data_overrides
from leaflens.config import config_dir
from leaflens.ops.sweep import apply_params, sample_params, sweep, trial_config

# Small but real: strategy x learning rate x LoRA rank x augmentation strength, 1 epoch each (FAST_TRAIN).
SEARCH = [
    "hparams_search.params.epochs=null",
    "hparams_search.params.last_k=null",
    "hparams_search.params.strategy.choices=[head,bitfit,lora]",
    "hparams_search.sampler.n_startup_trials=2",
    "hparams_search.heartbeat_interval=null",
]


def _sweep_cfg(prepared_root: Path, tmp: Path, configs: Path, *extra: str):
    return compose(
        *data_overrides(prepared_root),
        *FAST_TRAIN,
        *SEARCH,
        f"hparams_search.dir={tmp / 'sweep'}",
        f"hparams_search.best_experiment={configs / 'experiment' / 'swept.yaml'}",
        f"paths.output_dir={tmp / 'base'}",
        *extra,
        task_name="sweep",
    )


@pytest.mark.slow
def test_sweep_resumes_prunes_and_its_best_config_trains(
    prepared_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    sweep_dir = sweep(_sweep_cfg(prepared_root, tmp_path, configs, "hparams_search.n_trials=3"))

    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    study = optuna.load_study(study_name="leaflens-peft", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in study.trials:
        metrics = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["val_f1"]) and 0.0 <= t.value <= 1.0
        assert t.params["strategy"] in {"head", "bitfit", "lora"}
        assert ("lora_r" in t.params) == (t.params["strategy"] == "lora")

    # Second invocation: same study, one more trial, which a pruner that accepts nothing stops at its first
    # check.
    sweep(
        _sweep_cfg(
            prepared_root, tmp_path, configs, "hparams_search.n_trials=4",
            "hparams_search.pruner._target_=optuna.pruners.ThresholdPruner",
            "+hparams_search.pruner.lower=2.0",
            "~hparams_search.pruner.n_startup_trials", "~hparams_search.pruner.n_warmup_steps",
        )
    )  # fmt: skip
    study = optuna.load_study(study_name="leaflens-peft", storage=storage)
    assert len(study.trials) == 4
    assert study.trials[3].state == optuna.trial.TrialState.PRUNED
    assert not (Path(study.trials[3].user_attrs["run_dir"]) / "metrics.json").exists()
    assert "trial #" in (sweep_dir / "summary.md").read_text()

    # A third invocation has nothing left to do.
    sweep(_sweep_cfg(prepared_root, tmp_path, configs, "hparams_search.n_trials=4"))
    assert len(optuna.load_study(study_name="leaflens-peft", storage=storage).trials) == 4

    # The best trial as an experiment file: composes and trains, with the best parameters.
    best = study.best_trial
    text = (configs / "experiment" / "swept.yaml").read_text()
    assert text.startswith("# @package _global_") and text == (sweep_dir / "best.yaml").read_text()
    assert yaml.safe_load(text)["defaults"][0] == {"override /peft": best.params["strategy"]}
    monkeypatch.setenv("LEAFLENS_CONFIG_DIR", str(configs))
    cfg = compose("experiment=swept", f"paths.output_dir={tmp_path / 'best_run'}", task_name="train")
    assert cfg.peft.strategy == best.params["strategy"]
    assert cfg.optim.optimizer.lr == pytest.approx(best.params["lr"])
    assert cfg.data.augment.brightness == pytest.approx(best.params["augment_strength"])
    assert cfg.trainer.limit_train_batches == 3 and cfg.data.processed_dir == f"{prepared_root}/processed"

    from leaflens.train.run import train

    run = train(cfg)
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["val_f1"] <= 1.0


def test_search_space_sampling_and_conditions() -> None:
    cfg = compose(task_name="sweep")
    space = {
        "strategy": {"key": "peft", "choices": ["lora", "head", "lora_bitfit"]},
        "lora_r": {"key": "peft.lora_r", "choices": [4], "when": {"strategy": ["lora", "lora_bitfit"]}},
        "lr": {"key": "optim.optimizer.lr", "low": 1e-4, "high": 1e-2, "log": True},
        "epochs": {"key": "trainer.max_epochs", "low": 2, "high": 3},
        "aug": {"keys": ["data.augment.brightness", "data.augment.contrast"], "low": 0.0, "high": 0.5},
        "dropped": None,
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        trial = study.ask()
        values = sample_params(trial, space)
        seen.add(values["strategy"])
        assert ("lora_r" in values) == (values["strategy"] != "head")
        assert isinstance(values["epochs"], int) and 1e-4 <= values["lr"] <= 1e-2
        trial_cfg = apply_params(cfg, space, values)
        if values["strategy"] != "lora_bitfit":  # that option is the lora strategy with biases trained
            assert trial_cfg.peft.strategy == values["strategy"]
        assert trial_cfg.data.augment.brightness == trial_cfg.data.augment.contrast == values["aug"]
        assert trial_cfg.trainer.max_epochs == values["epochs"]
        if values["strategy"] == "head":
            assert "lora_r" not in trial_cfg.peft  # the whole group was swapped, no stale LoRA keys
        if values["strategy"] == "lora_bitfit":  # its defaults list (lora) is merged under it
            assert (
                trial_cfg.peft.lora_alpha == 8
                and trial_cfg.peft.lora_r == 4
                and "lora_targets" in trial_cfg.peft
            )
            assert trial_cfg.peft.lora_bias == "all" and "defaults" not in trial_cfg.peft
        study.tell(trial, 0.5)
    assert seen == {"lora", "head", "lora_bitfit"}
    assert cfg.peft.strategy == "lora" and cfg.trainer.max_epochs != 99  # the base config is untouched


def test_search_space_errors_name_the_problem() -> None:
    cfg = compose(task_name="sweep")
    trial = optuna.create_study().ask()
    with pytest.raises(KeyError, match="does not exist"):
        apply_params(cfg, {"x": {"key": "optim.nope", "low": 1, "high": 2}}, {"x": 1})
    with pytest.raises(ValueError, match="choices"):
        sample_params(trial, {"x": {"key": "optim.optimizer.lr"}})
    with pytest.raises(ValueError, match="config `key`"):
        apply_params(cfg, {"x": {"low": 1, "high": 2}}, {"x": 1})
    empty = compose("hparams_search.params=null", task_name="sweep")
    with pytest.raises(ValueError, match="hparams_search="):
        sweep(empty)


def test_trial_config_reroots_paths_and_groups_wandb_runs(tmp_path: Path) -> None:
    base = compose(
        "experiment=plantvillage_mini",  # the recipe refits on train + val and keeps its last epoch
        "logger=wandb",
        f"paths.output_dir={tmp_path / 'sweep-base'}",
        task_name="sweep",
    )
    space = {"strategy": {"key": "peft", "choices": ["head"]}}
    run_dir = tmp_path / "trials" / "0007"
    cfg = trial_config(base, space, {"strategy": "head"}, run_dir)
    assert cfg.paths.output_dir == str(run_dir)
    assert cfg.callbacks.checkpoint.dirpath == f"{run_dir}/checkpoints"  # resolved paths follow the trial
    assert cfg.logger.csv.save_dir == str(run_dir)
    assert cfg.callbacks.checkpoint.monitor == "val_f1" and cfg.callbacks.checkpoint.mode == "max"
    assert list(cfg.data.train_splits) == ["train"]  # trials are compared on validation, so never train on it
    assert list(base.data.train_splits) == ["train", "val"]
    assert cfg.logger.wandb.group == "leaflens-peft" and cfg.logger.wandb.name.endswith("0007")
    assert base.paths.output_dir == str(tmp_path / "sweep-base")  # the base config is left alone
