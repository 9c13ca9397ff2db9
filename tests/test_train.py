"""A real (shrunk) training run: run-directory contract, exact reload, evaluation parity and resume."""

from __future__ import annotations

import hashlib
import json
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST_TRAIN, compose, data_overrides
from leaflens.train.checkpoint import build_network, load_run, network_state


def test_run_directory_contents(trained_run: Path, prepared_root: Path) -> None:
    for name in ("config.yaml", "classes.json", "data.json", "metrics.json", "trainable.json", "run.log"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (
        (trained_run / "logs" / "metrics.csv").read_text().startswith(("epoch", "lr", "step", "train", "val"))
    )

    processed = prepared_root / "processed"
    assert json.loads((trained_run / "classes.json").read_text()) == json.loads(
        (processed / "classes.json").read_text()
    )
    data = json.loads((trained_run / "data.json").read_text())
    assert data["manifest_sha256"] == hashlib.sha256((processed / "manifest.csv").read_bytes()).hexdigest()

    cfg = OmegaConf.load(trained_run / "config.yaml")
    assert cfg.trainer.max_epochs == 1 and cfg.paths.output_dir == str(trained_run)

    trainable = json.loads((trained_run / "trainable.json").read_text())
    assert trainable["strategy"] == cfg.peft.strategy
    assert 0 < trainable["trainable"] < trainable["total"] and trainable["percent"] <= 5.0
    assert sum(row["trainable"] for row in trainable["modules"]) == trainable["trainable"]

    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0.0 <= metrics["val_acc"] <= 1.0 and 0.0 <= metrics["val_f1"] <= 1.0
    assert metrics["global_step"] == 3 and metrics["epochs_trained"] == 1
    assert metrics["train_images"] == 3 * 16 and metrics["train_img_per_s"] > 0


def test_folded_batchnorm_statistics_survive_training(trained_run: Path) -> None:
    """The offline backbone's BN is folded: training must leave every running statistic as it was."""
    import safetensors.torch

    bundled = safetensors.torch.load_file(
        Path(__file__).resolve().parents[1] / "models/pretrained/tf_mobilenetv3_small_100.fp16.safetensors"
    )
    state = load_run(trained_run).model.state_dict()
    stats = [k for k in bundled if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 50
    for key in stats:
        # Exact up to the EMA's float rounding; batch statistics would move them by orders of magnitude more.
        torch.testing.assert_close(state[key], bundled[key].float(), rtol=0, atol=1e-6, msg=key)


def test_reload_gives_identical_logits(trained_run: Path) -> None:
    first, second = load_run(trained_run), load_run(trained_run)
    assert not first.model.training
    names = [n for n, _ in first.model.named_modules()]
    assert not any("lora" in n or "modules_to_save" in n for n in names)  # merged into a plain timm model
    assert first.data_config["input_size"] == (3, 288, 288) and len(first.classes) == 38
    images = torch.randn(3, *first.data_config["input_size"])
    with torch.no_grad():
        logits = first.model(images)
        assert torch.equal(logits, second.model(images))
        # The unmerged network with the checkpoint's weights (what training validated) agrees with the merge.
        net = build_network(first.cfg, len(first.classes), pretrained=False, pretrained_file=None)
        net.load_state_dict(network_state(first.checkpoint))
        torch.testing.assert_close(logits, net.eval()(images), rtol=1e-4, atol=1e-4)
    assert logits.shape == (3, 38) and torch.isfinite(logits).all()


def test_reloaded_model_reproduces_validation_accuracy(trained_run: Path, prepared_root: Path) -> None:
    """Accuracy of the reloaded model on the same validation batches equals what training logged."""
    from leaflens.data.datamodule import PlantVillageDataModule

    run = load_run(trained_run)
    cfg = run.cfg
    dm = PlantVillageDataModule(prepared_root / "processed", run.data_config, batch_size=16, num_workers=0)
    dm.setup("validate")
    correct = total = 0
    with torch.no_grad():
        for index, (images, labels) in enumerate(dm.val_dataloader()):
            if index >= cfg.trainer.limit_val_batches:
                break
            correct += int((run.model(dm.normalize(images)).argmax(1) == labels).sum())
            total += labels.numel()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert correct / total == pytest.approx(metrics["val_acc"], abs=1e-6)


def test_resume_continues_from_the_saved_epoch(
    trained_run: Path, prepared_root: Path, tmp_path: Path
) -> None:
    from leaflens.train.run import train

    last = trained_run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 3
    cfg = compose(
        *data_overrides(prepared_root),
        *FAST_TRAIN,
        "trainer.max_epochs=2",
        f"ckpt_path={last}",
        f"paths.output_dir={tmp_path / 'resumed'}",
        task_name="train",
    )
    run_dir = train(cfg)
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 6  # one more epoch of 3 steps, not two
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The history of the first run travels in the checkpoint: both epochs are there, once each.
    assert [row["epoch"] for row in metrics["history"]] == [0, 1]
    assert metrics["history"][0] == json.loads((trained_run / "metrics.json").read_text())["history"][0]
    assert metrics["train_images"] == 6 * 16


@pytest.mark.parametrize(
    ("overrides", "kept_epoch"),
    [
        # A train-only run picks its best epoch on validation; ties keep the first.
        (["data.train_splits=[train]", "callbacks.checkpoint.monitor=val_acc"], 0),
        # The recipe as shipped refits on train + val, so validation picks nothing: it keeps the last epoch.
        ([], 1),
    ],
)
def test_last_checkpoint_is_the_last_epoch_and_best_follows_the_monitor(
    prepared_root: Path, tmp_path: Path, overrides: list[str], kept_epoch: int
) -> None:
    from leaflens.train.run import train

    # lr 0: the weights never move, so val_acc ties every epoch and only the selection rule decides.
    cfg = compose(
        *data_overrides(prepared_root),
        *FAST_TRAIN,
        "trainer.max_epochs=2",
        "optim.optimizer.lr=0.0",
        *overrides,
        f"paths.output_dir={tmp_path / 'run'}",
        task_name="train",
    )
    run_dir = train(cfg)
    checkpoints = run_dir / "checkpoints"
    best = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == kept_epoch
    assert last["epoch"] == 1 and last["global_step"] == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == kept_epoch
    assert metrics["monitor"] == ("val_acc" if overrides else None)


def test_a_run_with_lr_scales_reloads_and_trains_the_head_at_its_multiple(
    prepared_root: Path, tmp_path: Path
) -> None:
    """The multipliers reach the optimizer from the command line, and the checkpoint still loads with
    weights_only (a Hydra DictConfig among its hyperparameters would not)."""
    from leaflens.train.run import train

    cfg = compose(
        *data_overrides(prepared_root),
        *FAST_TRAIN,
        "++optim.lr_scales={classifier:3}",
        f"paths.output_dir={tmp_path / 'run'}",
        task_name="train",
    )
    run_dir = train(cfg)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["hyper_parameters"]["lr_scales"] == {"classifier": 3}
    [state] = last["optimizer_states"]
    plain = [group["lr"] for group in state["param_groups"] if "lr_scale" not in group]
    scaled = [group["lr"] for group in state["param_groups"] if group.get("lr_scale") == 3]
    assert plain and scaled and all(lr == pytest.approx(3 * plain[0]) for lr in scaled)
    assert load_run(run_dir).model(torch.zeros(1, 3, 64, 64)).isfinite().all()


@pytest.mark.slow
def test_wandb_logger_runs_offline_and_logs_the_best_model(
    prepared_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No account needed: without WANDB_API_KEY the W&B run is written offline, with the model artifact."""
    from leaflens.train.run import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = train(
        compose(
            *data_overrides(prepared_root),
            *FAST_TRAIN,
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "logger=wandb",
            f"paths.output_dir={tmp_path / 'run'}",
            task_name="train",
        )
    )
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), "no offline run file"
    assert (run_dir / "logs" / "metrics.csv").is_file()  # the CSV log is kept alongside
    # The offline run records the "model-<run id>" artifact holding best.ckpt (uploaded by `wandb sync`). The
    # wandb-core service may still be writing its transaction log when finish() returns (seen once in CI on a
    # loaded machine: the file held only its 7-byte header, and all 13.7 KB moments later), so give it time.
    run_id = runs[0].name.rsplit("-", 1)[-1]
    record, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline:
        record = next(runs[0].glob("*.wandb")).read_bytes()
        if f"model-{run_id}".encode() in record and b"best.ckpt" in record:
            break
        time.sleep(0.5)
    assert f"model-{run_id}".encode() in record and b"best.ckpt" in record, f"{len(record)} bytes"


def test_ema_follows_its_warm_up_schedule() -> None:
    """The fused EMA update equals the per-tensor formula: after step n the average moves by 1 - min(decay,
    (1 + n) / (10 + n)) towards the weights; integer buffers follow the same rule."""
    from functools import partial

    from torch.optim.swa_utils import AveragedModel

    from leaflens.train.module import _ema_update

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    # What the EMA callback builds (Lightning's WeightAveraging passes multi_avg_fn on to AveragedModel).
    averaged = AveragedModel(net, use_buffers=True, multi_avg_fn=partial(_ema_update, decay=0.99))
    expected = {k: v.clone().double() for k, v in net.state_dict().items()}
    averaged.update_parameters(net)  # the first call copies
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 40):
        with torch.no_grad():
            for tensor in net.state_dict().values():
                tensor.add_(torch.randint(0, 3, tensor.shape, generator=generator).to(tensor.dtype))
        averaged.update_parameters(net)
        weight = 1.0 - min(0.99, (1.0 + step) / (10.0 + step))
        for key, tensor in net.state_dict().items():
            moved = expected[key] + (tensor.double() - expected[key]) * weight
            expected[key] = moved.trunc() if not tensor.is_floating_point() else moved
    for key, tensor in averaged.module.state_dict().items():
        assert torch.allclose(tensor.double(), expected[key], atol=1e-4), key


@pytest.mark.parametrize(
    ("decay", "steps", "warns"),
    # The recipe's 0.99 ends at 0.9897 in its ~860 steps (a window of 97 steps instead of 100): close enough.
    # 0.995 would end at the same 0.9897, half the window it asks for.
    [(0.99, 860, False), (0.995, 860, True), (0.995, 1790, False), (0.9, 100, False)],
)
def test_ema_says_when_its_decay_is_never_reached(decay: float, steps: int, warns: bool) -> None:
    from types import SimpleNamespace

    from leaflens.logs import logger
    from leaflens.train.module import EMA, ema_decay_at

    assert ema_decay_at(890, 0.99) == 0.99 and ema_decay_at(889, 0.99) < 0.99
    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        # on_fit_start reads only the trainer's step estimate.
        EMA(decay).on_fit_start(SimpleNamespace(estimated_stepping_batches=steps), None)  # type: ignore[arg-type]
    finally:
        logger.remove(sink)
    assert bool(warnings) == warns
    if warns:
        assert f"{ema_decay_at(steps, decay):.4f}" in warnings[0] and str(decay) in warnings[0]


@pytest.mark.parametrize(
    ("total_steps", "min_warmup_steps", "warmup_steps"),
    [(800, 40, 40), (180, 0, 9), (180, 40, 40), (30, 40, 15)],  # 5 % unless the minimum is longer; <= half
)
def test_warmup_lasts_its_fraction_or_minimum_then_decays(
    total_steps: int, min_warmup_steps: int, warmup_steps: int
) -> None:
    from leaflens.train.module import warmup_cosine

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps, warmup_fraction=0.05, min_warmup_steps=min_warmup_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # The LR rises linearly over `warmup_steps` steps to the peak, then falls monotonically towards
    # min_lr_ratio (0.01).
    assert lrs[:warmup_steps] == pytest.approx([(i + 1) / warmup_steps for i in range(warmup_steps)])
    decay = lrs[warmup_steps:]
    assert decay[0] == pytest.approx(1.0) and all(a > b for a, b in pairwise(decay))
    assert 0.01 <= lrs[-1] < 0.05


def _tiny_classifier(head: torch.nn.Module) -> torch.nn.Sequential:
    """A 3-channel image classifier small enough for loss checks: an 8-channel conv, pooled, then ``head``."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("batch_size", [6, 5])
def test_mixup_trains_on_mixed_soft_targets_and_leaves_odd_batches_alone(batch_size: int) -> None:
    """`optim.mixup` (timm's Mixup): an even batch is mixed with its reverse and the loss is the smoothed
    cross-entropy against the mixed class probabilities; an odd batch (an epoch's last) trains unmixed."""
    from functools import partial

    from timm.data import Mixup

    from leaflens.train.module import ClassifierModule

    num_classes, smoothing = 4, 0.1
    built: dict = {}

    # What Hydra builds from `optim.mixup` (timm's Mixup as a partial), recording how it is called and its output.
    def recording_mixup(**kwargs: object):
        built["kwargs"] = kwargs
        mixer = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, **kwargs)

        def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            built["outputs"] = mixer(images, labels)
            return built["outputs"]

        return mix

    torch.manual_seed(0)
    net = _tiny_classifier(torch.nn.Linear(8, num_classes))
    module = ClassifierModule(
        net,
        num_classes,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        label_smoothing=smoothing,
        channels_last=False,
        mixup=recording_mixup,
    )
    # The loss owns label smoothing; the mixer must not smooth a second time.
    assert built["kwargs"] == {"num_classes": num_classes, "label_smoothing": 0.0}
    images = torch.randn(batch_size, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1][:batch_size])
    loss = module.training_step((images.clone(), labels), 0)

    if batch_size % 2:
        assert "outputs" not in built
        expected = torch.nn.functional.cross_entropy(net(images), labels, label_smoothing=smoothing)
    else:
        mixed, targets = built["outputs"]
        assert targets.shape == (batch_size, num_classes)
        assert torch.allclose(targets.sum(1), torch.ones(batch_size))
        # Each image is blended with its partner in the reversed batch, and so are the one-hot targets.
        one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
        lam = float(targets[0, labels[0]])  # labels[0] differs from its partner's, so this is lam
        assert 0.0 < lam <= 1.0
        assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)
        assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-5)
        expected = torch.nn.functional.cross_entropy(net(mixed), targets, label_smoothing=smoothing)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_target_margin_penalises_the_true_class_in_training_only() -> None:
    """optim.target_margin (CosFace's s x m with a cosine classifier): the training loss is the smoothed
    cross-entropy of the logits less the margin on each image's true class, which costs more than the plain
    loss; validation scores the plain logits; a negative margin is refused."""
    from functools import partial

    from leaflens.model.heads import CosineClassifier
    from leaflens.train.module import ClassifierModule

    num_classes, smoothing, margin = 4, 0.1, 2.4
    torch.manual_seed(0)
    net = _tiny_classifier(CosineClassifier(8, num_classes, scale=16.0))

    def build(target_margin: float) -> ClassifierModule:
        return ClassifierModule(
            net,
            num_classes,
            optimizer=partial(torch.optim.SGD, lr=0.1),
            label_smoothing=smoothing,
            target_margin=target_margin,
            channels_last=False,
        )

    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    logits = net(images).detach()
    shifted = logits.clone()
    shifted[torch.arange(6), labels] -= margin
    with torch.no_grad():
        loss = build(margin).training_step((images, labels), 0)
        plain = build(0.0).training_step((images, labels), 0)
    expected = torch.nn.functional.cross_entropy(shifted, labels, label_smoothing=smoothing)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert loss > plain
    # Soft targets (MixUp/CutMix) take the margin in proportion to each class's share.
    soft = torch.nn.functional.one_hot(labels, num_classes).float() * 0.7 + 0.3 / num_classes
    assert torch.allclose(build(margin)._with_margin(logits, soft), logits - margin * soft)

    module = build(margin)
    logged: dict[str, object] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # type: ignore[method-assign]
    with torch.no_grad():
        module.validation_step((images, labels), 0)
    plain_loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert torch.allclose(logged["val_loss"], plain_loss, atol=1e-6)  # type: ignore[arg-type]
    assert float(module.val_metrics["acc"].compute()) == float((logits.argmax(1) == labels).float().mean())
    with pytest.raises(ValueError, match="target_margin"):
        build(-1.0)


def test_lr_scales_step_matched_parameters_faster_through_the_schedule() -> None:
    """optim.lr_scales: LoRA+ (lora_B at 3x) and a head at 0.5x start at those multiples of the others' learning
    rate and keep them under the warm-up + cosine schedule; a key that matches nothing, or a schedule that resets
    the multiples, is refused."""
    from functools import partial
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from leaflens.train.module import ClassifierModule, warmup_cosine

    base = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)
    )
    net = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], modules_to_save=["3"]))

    def configure(scales: dict, scheduler=partial(warmup_cosine, warmup_fraction=0.1)) -> dict:
        module = ClassifierModule(
            net,
            4,
            optimizer=partial(torch.optim.AdamW, lr=1e-3),
            scheduler=scheduler,
            channels_last=False,
            lr_scales=scales,
        )
        # The run's length is all configure_optimizers asks of a trainer.
        module._trainer = SimpleNamespace(estimated_stepping_batches=20)
        return module.configure_optimizers()

    config = configure({"lora_B": 3.0, r"^base_model\.model\.3\.": 0.5})
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    lora_b = {id(p) for n, p in trainable.items() if "lora_B" in n}
    head = {id(p) for n, p in trainable.items() if n.startswith("base_model.model.3.")}
    assert lora_b and head and not lora_b & head

    def ids(scale: float | None) -> set[int]:
        groups = [g for g in optimizer.param_groups if g.get("lr_scale") == scale]
        return {id(p) for g in groups for p in g["params"]}

    assert ids(3.0) == lora_b and ids(0.5) == head
    assert ids(None) == {id(p) for p in trainable.values()} - lora_b - head
    # The head's bias (1-D) gets no weight decay in its scaled group either.
    assert {g["weight_decay"] for g in optimizer.param_groups if g.get("lr_scale") == 0.5} == {0.0, 0.05}
    plain = next(g for g in optimizer.param_groups if "lr_scale" not in g)
    for _ in range(7):  # through the warm-up and into the cosine
        optimizer.step()
        scheduler.step()
        assert plain["lr"] > 0
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(group.get("lr_scale", 1.0) * plain["lr"])
    # Without scales, the plain two groups (weight matrices, then the rest): no lr_scale anywhere.
    groups = configure({})["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and not any("lr_scale" in g for g in groups)

    def one_cycle(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
        return torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps)

    with pytest.raises(ValueError, match="OneCycleLR"):
        configure({"lora_B": 3.0}, one_cycle)
    with pytest.raises(ValueError, match="'lora_b' matches no trainable parameter"):
        configure({"lora_b": 3.0})  # a typo: regexes are case-sensitive
    for name, p in net.named_parameters():  # a head-only model: nothing for LoRA+ to act on
        p.requires_grad_("modules_to_save" in name)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        configure({"lora_B": 3.0})
