"""The model factory: real weights files (bundled fp16, torch state dict), classifier swap, hub errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from leaflens.logs import logger
from leaflens.model.factory import create_model

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "pretrained" / "tf_mobilenetv3_small_100.fp16.safetensors"
SHARED = REPO.parent / "shared" / "weights" / "tf_mobilenetv3_small_100.safetensors"
ARCH = "tf_mobilenetv3_small_100"


@pytest.fixture(scope="module")
def bundled_state() -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(BUNDLED)


def test_bundled_weights_file_into_38_classes(bundled_state: dict[str, torch.Tensor]) -> None:
    assert bundled_state["classifier.weight"].shape == (1000, 1024)  # the file carries the ImageNet head
    model = create_model(ARCH, num_classes=38, pretrained_file=BUNDLED).eval()
    state = model.state_dict()
    assert state["classifier.weight"].shape == (38, 1024)
    # Every backbone tensor comes from the file (fp16 -> fp32 exactly); only the classifier is new.
    for key, value in bundled_state.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value.to(state[key].dtype)), key
    logits = model(torch.rand(2, 3, 224, 224) * 2 - 1)
    assert logits.shape == (2, 38) and torch.isfinite(logits).all()
    # BatchNorm is folded in this backbone: identity statistics, which is why freeze_bn_stats exists.
    assert torch.count_nonzero(state["blocks.4.0.bn1.running_mean"]) == 0


@pytest.mark.skipif(not SHARED.is_file(), reason="shared fp32 weights not available")
def test_bundled_fp16_copy_matches_the_fp32_original(bundled_state: dict[str, torch.Tensor]) -> None:
    original = safetensors.torch.load_file(SHARED)
    assert original.keys() == bundled_state.keys()
    for key, value in original.items():
        if value.is_floating_point():
            assert bundled_state[key].dtype == torch.float16
            torch.testing.assert_close(bundled_state[key].float(), value, rtol=1e-3, atol=1e-4)


def test_torch_state_dict_file_loads_like_safetensors(
    tmp_path: Path, bundled_state: dict[str, torch.Tensor]
) -> None:
    pth = tmp_path / "weights.pth"
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in bundled_state.items()}, pth)
    from_pth = create_model(ARCH, num_classes=5, pretrained_file=pth).state_dict()
    from_st = create_model(ARCH, num_classes=5, pretrained_file=BUNDLED).state_dict()
    for key in from_st:
        if not key.startswith("classifier."):
            assert torch.equal(from_pth[key], from_st[key]), key


def test_wrong_architecture_file_is_refused(tmp_path: Path, bundled_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(RuntimeError, match=r"size mismatch|Missing key|Unexpected key"):
        create_model("mobilenetv3_large_100", num_classes=38, pretrained_file=BUNDLED)


def test_missing_weights_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_file"):
        create_model(ARCH, num_classes=38, pretrained_file=tmp_path / "nope.safetensors")


def test_random_init_only_when_asked(bundled_state: dict[str, torch.Tensor]) -> None:
    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        model = create_model(ARCH, num_classes=38, pretrained=False)
        assert any("RANDOM initialisation" in w for w in warnings)  # loud when training would start from it
        warnings.clear()
        create_model(ARCH, num_classes=38, pretrained=False, checkpoint_follows=True)
        assert warnings == []  # rebuilding a run for its checkpoint is not a random init
    finally:
        logger.remove(sink)
    assert not torch.equal(model.state_dict()["conv_stem.weight"], bundled_state["conv_stem.weight"].float())


@pytest.mark.parametrize(("arch", "output_stride"), [(ARCH, 16), ("mobilenetv3_small_100", 8)])
def test_output_stride_matches_timms_own_dilated_builder(arch: str, output_stride: int) -> None:
    """The dilated classifier computes what timm's feature extractor built with that output stride computes."""
    model = create_model(
        arch, num_classes=5, pretrained=False, checkpoint_follows=True, output_stride=output_stride
    )
    reference = timm.create_model(arch, features_only=True, output_stride=output_stride, pretrained=False)
    # Same weights in both (the extractor has no head): the conversion changes strides and dilations, no tensor.
    reference.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("conv_head", "classifier"))}
    )
    model.eval()
    reference.eval()
    photos = torch.rand(2, 3, 160, 160)
    features = model.forward_features(photos)
    assert features.shape[-2:] == (160 // output_stride, 160 // output_stride)
    torch.testing.assert_close(features, reference(photos)[-1], rtol=0, atol=0)
    plain = create_model(arch, num_classes=5, pretrained=False, checkpoint_follows=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    logits = model(photos)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_output_stride_refuses_what_it_cannot_convert() -> None:
    with pytest.raises(ValueError, match="8, 16 or 32"):
        create_model(ARCH, num_classes=5, pretrained=False, output_stride=4)
    with pytest.raises(ValueError, match="EfficientNet-family"):
        create_model("resnet10t", num_classes=5, pretrained=False, output_stride=16)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_hub_fails_at_once_with_the_fix(tmp_path: Path) -> None:
    """A real refused connection (nothing listens on the port), not a mock: the error must come fast and say
    how.
    """
    code = (
        "from leaflens.model.factory import create_model\n"
        "try:\n"
        "    create_model('mobilenetv3_large_100', num_classes=38)\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    env = {
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "HF_HOME": str(tmp_path / "hf"),  # empty cache: the weights really have to be downloaded
        "PATH": "/usr/bin:/bin",
        "NO_PROXY": "*",
    }
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR:" in result.stdout, result.stdout + result.stderr
    message = result.stdout
    assert "model=mobilenetv3_small_offline" in message and "model.pretrained_file=" in message
    # huggingface_hub alone would retry with back-off for about a minute; the pre-flight check fails in
    # seconds.
    assert "Retry" not in result.stderr
    assert time.perf_counter() - start < 60


def test_cosine_classifier_scores_scaled_cosines_on_the_same_backbone() -> None:
    from leaflens.model.heads import CosineClassifier

    linear = create_model(ARCH, num_classes=5, pretrained_file=BUNDLED).eval()
    model = create_model(
        ARCH, num_classes=5, pretrained_file=BUNDLED, classifier="cosine", cosine_scale=10
    ).eval()
    head = model.get_classifier()
    assert isinstance(head, CosineClassifier) and float(head.scale) == 10
    # Same backbone weights; the classifier keeps the linear layer's weight shape and drops its bias.
    state, linear_state = model.state_dict(), linear.state_dict()
    assert state.keys() - linear_state.keys() == {"classifier.scale"}
    assert linear_state.keys() - state.keys() == {"classifier.bias"}
    assert state["classifier.weight"].shape == linear_state["classifier.weight"].shape
    assert not any(name == "classifier.scale" for name, _ in model.named_parameters())  # fixed, not trained
    with torch.no_grad():
        features = model.forward_head(
            model.forward_features(torch.rand(3, 3, 96, 96) * 2 - 1), pre_logits=True
        )
        logits = head(features)
        # Only the direction of the features counts: a rescaled feature vector gets the same logits.
        torch.testing.assert_close(head(3.0 * features), logits)
        cosines = torch.nn.functional.cosine_similarity(features[:, None], head.weight[None], dim=-1)
        torch.testing.assert_close(logits, 10 * cosines, rtol=1e-5, atol=1e-5)
    assert logits.shape == (3, 5) and logits.abs().max() <= 10


def test_unknown_classifier_is_refused_before_any_weights_load() -> None:
    # A hub name with no network: the kind is checked first, so the error is about the kind, not the hub.
    with pytest.raises(ValueError, match=r"model\.classifier must be one of"):
        create_model("mobilenetv3_large_100", num_classes=5, classifier="mlp")
    with pytest.raises(ValueError, match=r"scale must be > 0"):
        create_model(ARCH, num_classes=5, pretrained=False, classifier="cosine", cosine_scale=0)
