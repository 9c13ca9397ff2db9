"""``sweep(cfg) -> sweep directory``: an Optuna study over ``hparams_search.params``, one run per trial.

The study lives in ``hparams_search.storage`` (SQLite by default): a second ``leaflens sweep`` continues it,
several workers share it. Each trial is an ordinary run directory (``<dir>/trials/<number>``) trained by
:func:`leaflens.train.run.train` with Optuna's Lightning pruning callback; the objective is
``metrics.json[hparams_search.metric]``. The best trial is written as an experiment file (``best.yaml``, also
copied to ``hparams_search.best_experiment``) that ``leaflens train experiment=<name>`` trains.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from leaflens.config import config_dir, load_config
from leaflens.logs import logger

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# Config sections a training run depends on: the best-experiment file repeats those that differ from the
# defaults.
TRAINING_SECTIONS = ("seed", "data", "model", "peft", "optim", "trainer", "callbacks")


def _is_group(key: str) -> bool:
    return "." not in key and (config_dir() / key).is_dir()


def _matches(value: Any, condition: Any) -> bool:
    """``when: {param: value}`` or ``when: {param: [value, ...]}``."""
    return value in condition if isinstance(condition, list | tuple) else value == condition


def load_option(group: str, option: str) -> DictConfig:
    """``configs/<group>/<option>.yaml`` over its same-group ``defaults`` (``lora_bitfit`` on ``lora``)."""
    node = OmegaConf.load(config_dir() / group / f"{option}.yaml")
    assert isinstance(node, DictConfig)
    defaults = node.pop("defaults", None)
    if not defaults:
        return node
    merged: Any = OmegaConf.create()
    for entry in [*defaults, *([] if "_self_" in defaults else ["_self_"])]:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
        elif isinstance(entry, str) and "/" not in entry:
            merged = OmegaConf.merge(merged, load_option(group, entry))
        else:
            raise ValueError(f"{group}/{option}: only same-group defaults can be swept, got {entry!r}")
    assert isinstance(merged, DictConfig)
    return merged


def sample_params(trial: optuna.Trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """Sample every parameter of ``space`` whose ``when`` condition holds (define-by-run, in order)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if spec is None:
            continue
        if not all(_matches(values.get(k), v) for k, v in (spec.get("when") or {}).items()):
            continue
        if "choices" in spec:
            values[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif "low" not in spec or "high" not in spec:
            raise ValueError(f"hparams_search.params.{name}: give `choices` or `low` and `high`")
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[name] = trial.suggest_int(
                name, spec["low"], spec["high"], step=spec.get("step") or 1, log=bool(spec.get("log"))
            )
        else:
            low, high, log = float(spec["low"]), float(spec["high"]), bool(spec.get("log"))
            values[name] = trial.suggest_float(name, low, high, step=spec.get("step"), log=log)
    return values


def _keys(name: str, spec: Mapping[str, Any]) -> list[str]:
    keys = spec.get("keys") or ([spec["key"]] if spec.get("key") else [])
    if not keys:
        raise ValueError(f"hparams_search.params.{name}: give the config `key` (or `keys`) it sets")
    return list(keys)


def apply_params(base: DictConfig, space: Mapping[str, Any], values: Mapping[str, Any]) -> DictConfig:
    """A copy of ``base`` with the values set; a group key (``peft``) loads its ``configs/<group>/`` file."""
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        for name, value in values.items():
            for key in _keys(name, space[name]):
                if _is_group(key):
                    cfg[key] = load_option(key, str(value))
                elif OmegaConf.select(cfg, key, default=KeyError) is KeyError:
                    raise KeyError(f"hparams_search.params.{name}: config key {key!r} does not exist")
                else:
                    OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.resolve(cfg)
    return cfg


def _reroot(node: Any, old: str, new: str) -> Any:
    """Strings under ``old`` (the sweep's output dir, resolved into logger/checkpoint paths) -> ``new``."""
    if isinstance(node, DictConfig):
        for key in node:
            node[key] = _reroot(node[key], old, new)
        return node
    if isinstance(node, ListConfig):
        return [_reroot(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old) :]
    return node


def trial_config(
    base: DictConfig, space: Mapping[str, Any], values: Mapping[str, Any], run_dir: Path
) -> DictConfig:
    """One trial's training config: sampled values, own run directory, checkpoints chosen by the metric."""
    cfg = apply_params(base, space, values)
    search = base.hparams_search
    with open_dict(cfg):
        _reroot(cfg, str(base.paths.output_dir), str(run_dir))
        cfg.paths.output_dir = str(run_dir)
        # Trials are compared on validation, so they never train on it (a recipe may refit on train + val).
        cfg.data.train_splits = ["train"]
        for name in ("checkpoint", "early_stopping"):
            if cfg.callbacks.get(name) is not None:
                cfg.callbacks[name].monitor = search.monitor
                cfg.callbacks[name].mode = "max" if search.direction == "maximize" else "min"
        if cfg.logger.get("wandb") is not None:
            cfg.logger.wandb.group = search.study_name
            cfg.logger.wandb.name = f"{search.study_name}-trial-{run_dir.name}"
    return cfg


def make_storage(cfg: DictConfig) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so trials of a killed worker are failed and retried by the next worker."""
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    url = str(cfg.storage)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several local workers write to one file: wait for the lock instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    heartbeat = cfg.get("heartbeat_interval")
    if heartbeat:
        kwargs |= {
            "heartbeat_interval": int(heartbeat),
            "grace_period": 2 * int(heartbeat),
            "failed_trial_callback": RetryFailedTrialCallback(max_retry=cfg.get("max_retry")),
        }
    return RDBStorage(url, **kwargs)


def _leaf_diff(current: Any, default: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys whose values differ between two plain containers."""
    if isinstance(current, dict) and isinstance(default, dict):
        out: dict[str, Any] = {}
        for key, value in current.items():
            out |= _leaf_diff(value, default.get(key, object()), f"{prefix}{key}.")
        return out
    return {} if current == default else {prefix.rstrip("."): current}


def best_experiment(base: DictConfig, space: Mapping[str, Any], trial: optuna.trial.FrozenTrial) -> str:
    """The best trial as a ``# @package _global_`` experiment file: group overrides + values that differ."""
    defaults_cfg = load_config([], task_name=str(base.task_name))
    best = apply_params(base, space, trial.params)
    groups = {k: v for n, v in trial.params.items() for k in _keys(n, space[n]) if _is_group(k)}
    plain_best: dict[str, Any] = OmegaConf.to_container(best, resolve=True)  # type: ignore[assignment]
    plain_default: dict[str, Any] = OmegaConf.to_container(defaults_cfg, resolve=True)  # type: ignore[assignment]
    output_dir, root_dir = str(base.paths.output_dir), str(base.paths.root_dir)
    values = {}
    for section in TRAINING_SECTIONS:
        if section in groups:  # the group file is chosen in `defaults`; keep only what differs from that file
            plain_default[section] = OmegaConf.to_container(
                load_option(section, groups[section]), resolve=True
            )
        for key, value in _leaf_diff(
            plain_best.get(section), plain_default.get(section), f"{section}."
        ).items():
            if isinstance(value, str) and output_dir in value:
                continue  # per-run paths (checkpoint dirs...) derive from paths.output_dir
            if isinstance(value, str) and value.startswith(root_dir + "/"):
                value = "${paths.root_dir}" + value[len(root_dir) :]  # portable to another checkout
            values[key] = value
    nested = OmegaConf.create()
    for key, value in values.items():
        OmegaConf.update(nested, key, value, force_add=True)
    header = [
        "# @package _global_",
        f"# Best trial #{trial.number} of the Optuna study {base.hparams_search.study_name!r}: "
        f"{base.hparams_search.metric} = {trial.value:.4f}",
        f"# Parameters: {json.dumps(trial.params)}",
        f"# Written by `leaflens sweep` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; train it with",
        f"#   leaflens train experiment={Path(str(base.hparams_search.best_experiment)).stem}",
    ]
    body = {}
    if groups:
        body["defaults"] = [{f"override /{group}": option} for group, option in groups.items()] + ["_self_"]
    body |= OmegaConf.to_container(nested)  # type: ignore[arg-type]
    return "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.create(body))


def _summary(study: optuna.Study, search: DictConfig, best_path: Path | None) -> str:
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    lines = [
        f"# Sweep {search.study_name}",
        "",
        f"Storage: `{search.storage}` · direction: {search.direction} · metric: `{search.metric}`",
        f"Trials: {', '.join(f'{k.lower()} {v}' for k, v in sorted(states.items()))}",
        "",
    ]
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        lines += [
            f"Best: trial #{best.number}, {search.metric} = {best.value:.4f}, `{json.dumps(best.params)}`"
        ]
        lines += [f"Experiment file: `{best_path}`", "", "| trial | value | params |", "|---|---|---|"]
        reverse = search.direction == "maximize"
        for t in sorted(completed, key=lambda t: t.value or 0.0, reverse=reverse)[:10]:
            lines.append(f"| {t.number} | {t.value:.4f} | `{json.dumps(t.params)}` |")
    return "\n".join([*lines, ""])


def sweep(cfg: DictConfig) -> Path:
    """Run (or continue) the study until it holds ``hparams_search.n_trials`` finished trials.

    Returns:
        The sweep directory ``hparams_search.dir``: ``trials/<n>/`` run directories, ``trials.csv``,
        ``summary.md`` and ``best.yaml``.
    """
    search = cfg.get("hparams_search")
    if not search or not search.get("params"):
        raise ValueError(
            "no search space: choose one with hparams_search=<name> (see configs/hparams_search/)"
        )
    # The training stack loads only once there is something to train.
    from hydra.utils import instantiate
    from optuna_integration import PyTorchLightningPruningCallback

    from leaflens.train.run import train

    space: dict[str, Any] = OmegaConf.to_container(search.params, resolve=True)  # type: ignore[assignment]
    sweep_dir = Path(search.dir)
    (sweep_dir / "trials").mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=str(search.study_name),
        storage=make_storage(search),
        direction="minimize" if search.direction == "minimize" else "maximize",
        sampler=instantiate(search.sampler) if search.get("sampler") else None,
        pruner=instantiate(search.pruner) if search.get("pruner") else None,
        load_if_exists=True,
    )

    def objective(trial: optuna.Trial) -> float:
        values = sample_params(trial, space)
        run_dir = sweep_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        logger.info("Trial {} of {}: {}", trial.number, search.study_name, values)
        pruning = PyTorchLightningPruningCallback(trial, monitor=str(search.monitor))
        run = train(trial_config(cfg, space, values, run_dir), callbacks=[pruning])
        pruning.check_pruned()  # raises TrialPruned when the pruner stopped a distributed run
        metrics = json.loads((run / "metrics.json").read_text())
        if search.metric not in metrics:
            raise KeyError(f"{run}/metrics.json has no {search.metric!r} (keys: {sorted(metrics)})")
        return float(metrics[search.metric])

    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    remaining = int(search.n_trials) - done
    if remaining > 0:
        logger.info("Study {}: {} finished trials, running {} more", search.study_name, done, remaining)
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=search.get("timeout"),
            # Other workers add trials too: stop when the study as a whole has enough.
            callbacks=[optuna.study.MaxTrialsCallback(int(search.n_trials), states=FINISHED)],
            # A diverging or crashing trial is recorded as failed and the sweep goes on; config errors still
            # raise.
            catch=(RuntimeError, FloatingPointError),
            gc_after_trial=True,
        )
    else:
        logger.info(
            "Study {} already has {} finished trials (n_trials={})", search.study_name, done, search.n_trials
        )

    study.trials_dataframe().to_csv(sweep_dir / "trials.csv", index=False)
    best_path = None
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        best_path = sweep_dir / "best.yaml"
        best_path.write_text(best_experiment(cfg, space, study.best_trial))
        if search.get("best_experiment"):
            target = Path(search.best_experiment)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best_path, target)
            logger.info("Best trial #{} -> {}", study.best_trial.number, target)
    (sweep_dir / "summary.md").write_text(_summary(study, search, best_path))
    if best_path is None:
        raise RuntimeError(f"no trial of study {search.study_name} completed; see {sweep_dir / 'trials.csv'}")
    return sweep_dir
