"""The exported package: ONNX parity with PyTorch, contents per docs/design.md, refusal when tampered or
incomplete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import FAST_TRAIN, SAMPLE_DIR, compose, data_overrides
from leaflens.images import decode_image
from leaflens.preprocessing import preprocess_batch
from leaflens.serving.engine import InferenceEngine
from leaflens.serving.package import PackageError, load_package

PACKAGE_FILES = {
    "model.onnx", "labels.json", "preprocess.json", "calibration.json", "model.json", "weights.safetensors",
    "metrics.json", "parity.json", "MODEL_CARD.md", "manifest.json",
}  # fmt: skip


def _sample_images(n: int = 12) -> list[np.ndarray]:
    paths = sorted(p for p in SAMPLE_DIR.rglob("*.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [decode_image(p) for p in paths[:: max(1, len(paths) // n)][:n]]


def test_package_has_every_file_and_a_passing_parity_report(model_package: Path) -> None:
    names = {p.name for p in model_package.iterdir()}
    assert names >= PACKAGE_FILES
    assert "model.onnx.data" not in names  # weights folded into one file
    manifest = json.loads((model_package / "manifest.json").read_text())["files"]
    assert set(manifest) == names - {"manifest.json"}
    parity = json.loads((model_package / "parity.json").read_text())
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-4
    model = onnx.load(str(model_package / "model.onnx"))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]
    card = (model_package / "MODEL_CARD.md").read_text()
    for heading in ("## Data and split", "## Metrics", "## Intended use", "## Limits", "Missing classes"):
        assert heading in card


@pytest.mark.slow
def test_onnx_matches_pytorch_on_the_bundled_sample(model_package: Path, trained_run: Path) -> None:
    import torch

    from leaflens.explain import load_package_model
    from leaflens.export.onnx import LogitsAndEmbedding
    from leaflens.train.checkpoint import load_run

    engine = InferenceEngine.from_package(model_package)
    images = _sample_images()
    batch = preprocess_batch(images, engine.spec)
    ort_logits, ort_emb = engine.infer(batch)
    assert ort_logits.shape == (len(images), len(engine.labels)) and np.isfinite(ort_logits).all()
    flips = json.loads((model_package / "model.json").read_text())["test_time_flips"]
    assert flips == load_run(trained_run).test_time_flips
    with torch.no_grad():
        for model in (load_run(trained_run).model, load_package_model(model_package)):
            logits, emb = LogitsAndEmbedding(model.eval(), flips)(torch.from_numpy(batch))
            assert np.abs(logits.numpy() - ort_logits).max() <= 1e-4
            assert np.abs(emb.numpy() - ort_emb).max() <= 1e-4
            assert (logits.numpy().argmax(1) == ort_logits.argmax(1)).all()
    # Dynamic batch: one image at a time gives the same numbers as the batch.
    single = np.concatenate([engine.infer(batch[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(single, ort_logits[:3], atol=1e-5)


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_test_time_flips_average_the_four_views_in_torch_and_onnx(tmp_path: Path, classifier: str) -> None:
    import torch

    from leaflens.export.onnx import LogitsAndEmbedding, check_parity, export_onnx, four_flips
    from leaflens.model.factory import create_model
    from leaflens.serving.engine import make_session

    torch.manual_seed(0)
    model = create_model(
        "tf_mobilenetv3_small_100", 5, pretrained=False, checkpoint_follows=True, classifier=classifier,
        exportable=True,
    ).eval()  # fmt: skip
    image = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        logits, embedding = LogitsAndEmbedding(model, flips=True)(image)
        views = model(four_flips(image)).reshape(4, 3, 5)
        assert not torch.allclose(views[0], views[1], atol=1e-3)  # the flips are different inputs
        torch.testing.assert_close(logits, views.mean(dim=0), atol=1e-5, rtol=1e-5)
        assert embedding.shape == (3, model.get_classifier().in_features)
        # The four views of a flipped photo are the same four views: its answer cannot change.
        flipped, _ = LogitsAndEmbedding(model, flips=True)(image.flip(3))
        torch.testing.assert_close(flipped, logits, atol=1e-5, rtol=1e-5)

    path = export_onnx(model, tmp_path / "model.onnx", (3, 96, 96), flips=True)
    batch = image.numpy()
    report = check_parity(model, path, batch, atol=1e-4, flips=True)
    assert report["passed"]
    single = make_session(path).run(["logits"], {"image": batch[:1]})[0]
    np.testing.assert_allclose(single, logits.numpy()[:1], atol=1e-4)


@pytest.mark.slow
def test_a_run_with_test_time_flips_and_a_dilated_last_stage_exports_both(
    tmp_path: Path, prepared_root: Path, trained_run: Path
) -> None:
    import torch
    from omegaconf import OmegaConf

    from leaflens.explain import load_package_model
    from leaflens.export.onnx import four_flips
    from leaflens.export.run import export
    from leaflens.train.checkpoint import load_run

    run = shutil.copytree(trained_run, tmp_path / "run")
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.model.test_time_flips = True
    cfg.model.output_stride = 16  # same weights, another network: export must record it
    OmegaConf.save(cfg, run / "config.yaml")
    package = export(
        compose(*data_overrides(prepared_root), f"run={run}", "export.reference_images=8",
                f"paths.output_dir={tmp_path / 'package'}", task_name="export")
    )  # fmt: skip
    info = json.loads((package / "model.json").read_text())
    assert info["test_time_flips"] is True and info["output_stride"] == 16
    engine = InferenceEngine.from_package(package)
    batch = torch.from_numpy(preprocess_batch(_sample_images(4), engine.spec))
    logits, _ = engine.infer(batch.numpy())
    model = load_run(run).model
    with torch.no_grad():
        assert model.forward_features(batch).shape[-1] == -(-batch.shape[-1] // 16)  # "same" padding: ceil
        views = model(four_flips(batch)).reshape(4, len(batch), -1)
        rebuilt = load_package_model(package)(batch)  # Grad-CAM's network: the dilated one, one view
    np.testing.assert_allclose(logits, views.mean(dim=0).numpy(), atol=1e-4)
    np.testing.assert_allclose(rebuilt.numpy(), views[0].numpy(), atol=1e-4)


@pytest.mark.slow
def test_a_cosine_classifier_run_reloads_exports_and_rebuilds_for_gradcam(
    tmp_path: Path, prepared_root: Path
) -> None:
    import torch

    from leaflens.explain import load_package_model
    from leaflens.export.onnx import reference_logits
    from leaflens.export.run import export
    from leaflens.model.heads import CosineClassifier
    from leaflens.train.checkpoint import build_network, load_run, network_state
    from leaflens.train.run import train

    run_dir = tmp_path / "run"
    train(
        compose(*data_overrides(prepared_root), *FAST_TRAIN, "model.classifier=cosine", "model.cosine_scale=12",
                f"paths.output_dir={run_dir}", task_name="train")
    )  # fmt: skip
    run = load_run(run_dir)
    head = run.model.get_classifier()
    assert isinstance(head, CosineClassifier) and float(head.scale) == 12
    images = torch.randn(3, *run.data_config["input_size"])
    with torch.no_grad():
        logits = run.model(images)
        assert torch.equal(logits, load_run(run_dir).model(images))
        # The unmerged network with the checkpoint's weights (what training validated) agrees with the merge.
        net = build_network(run.cfg, len(run.classes), pretrained=False, pretrained_file=None)
        net.load_state_dict(network_state(run.checkpoint))
        torch.testing.assert_close(logits, net.eval()(images), rtol=1e-4, atol=1e-4)
    assert logits.abs().max() <= 12 and torch.isfinite(logits).all()

    package = export(
        compose(*data_overrides(prepared_root), f"run={run_dir}", "export.reference_images=8",
                f"paths.output_dir={tmp_path / 'package'}", task_name="export")
    )  # fmt: skip
    info = json.loads((package / "model.json").read_text())
    assert info["classifier"] == "cosine" and info["cosine_scale"] == 12
    assert "Cosine classifier: logits are 12 x" in (package / "MODEL_CARD.md").read_text()
    engine = InferenceEngine.from_package(package)
    batch = preprocess_batch(_sample_images(4), engine.spec)
    onnx_logits, _ = engine.infer(batch)
    with torch.no_grad():
        expected = reference_logits(run.model, torch.from_numpy(batch), run.test_time_flips)
        rebuilt = load_package_model(package)(torch.from_numpy(batch))  # Grad-CAM's network: one view
        single_view = run.model(torch.from_numpy(batch))
    np.testing.assert_allclose(onnx_logits, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(rebuilt.numpy(), single_view.numpy(), atol=1e-4)


def test_gradcam_overlay_from_the_package(model_package: Path) -> None:
    from leaflens.explain import explain_package_image

    image = _sample_images(1)[0]
    overlay = explain_package_image(model_package, image, class_id=0)
    _, h, w = json.loads((model_package / "preprocess.json").read_text())["input_size"]
    assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8 and overlay.std() > 0


def test_target_layer_comes_from_the_model_not_a_name() -> None:
    import timm

    from leaflens.explain import find_target_layer

    for arch, expected in (("resnet18", "layer4"), ("tf_mobilenetv3_small_100", "blocks.5")):
        name, _ = find_target_layer(
            timm.create_model(arch, pretrained=False, num_classes=5).eval(), (3, 64, 64)
        )
        assert name == expected


@pytest.fixture
def package_copy(model_package: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "package"
    shutil.copytree(model_package, copy)
    return copy


def test_tampered_file_is_refused_by_name(package_copy: Path) -> None:
    labels = json.loads((package_copy / "labels.json").read_text())
    labels[0]["display_name"] = "Something else"
    (package_copy / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(PackageError, match=r"checksum mismatch for labels\.json"):
        InferenceEngine.from_package(package_copy)


def test_truncated_model_is_refused(package_copy: Path) -> None:
    onnx_path = package_copy / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    with pytest.raises(PackageError, match=r"model\.onnx"):
        load_package(package_copy)


@pytest.mark.parametrize("missing", ["calibration.json", "preprocess.json", "manifest.json"])
def test_incomplete_package_is_refused(package_copy: Path, missing: str) -> None:
    (package_copy / missing).unlink()
    with pytest.raises(PackageError, match=missing.replace(".", r"\.")):
        load_package(package_copy)


def test_required_file_left_out_of_the_manifest_is_refused(package_copy: Path) -> None:
    manifest = json.loads((package_copy / "manifest.json").read_text())
    del manifest["files"]["model.json"]
    (package_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"model\.json"):
        load_package(package_copy)


def test_int8_quantization_report_and_gate(model_package: Path, tmp_path: Path) -> None:
    from leaflens.export.quantize import Int8RefusedError, compare_int8, gate_int8, quantize_int8

    spec = json.loads((model_package / "preprocess.json").read_text())
    batch = preprocess_batch(_sample_images(16), spec)
    int8_path = quantize_int8(model_package / "model.onnx", tmp_path / "model.int8.onnx", batch[:8])
    assert int8_path.stat().st_size < (model_package / "model.onnx").stat().st_size / 2
    labels = InferenceEngine.from_package(model_package).infer(batch)[0].argmax(1)
    report = compare_int8(model_package / "model.onnx", int8_path, batch, labels)
    assert report["accuracy_fp32"] == 1.0  # labels are the fp32 model's own answers
    assert report["accuracy_drop_points"] == pytest.approx(100 * (1.0 - report["accuracy_int8"]))
    assert report["top1_agreement"] == pytest.approx(report["accuracy_int8"])
    assert report["speedup"] > 0
    assert gate_int8({**report, "accuracy_drop_points": 0.2}, 0.5)["accepted"]
    with pytest.raises(Int8RefusedError, match="exceeds"):
        gate_int8({**report, "accuracy_drop_points": 0.8}, 0.5)
