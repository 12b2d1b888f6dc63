"""timm factory, width multiplier parity and the published cost reference values."""
from __future__ import annotations

import logging
import time

import huggingface_hub
import pytest
import timm
import torch

from models import factory, hub
from models.factory import ModelError, create_model, load_weights, resolve_model
from models.stats import count_params, model_stats


@pytest.mark.parametrize(
    "name, flops, params",
    [("lcnet_050", 45_998_976, 613_947), ("resnet18", 1_818_559_488, 11_182_155), ("mobilenetv4_conv_small", 188_715_520, 2_507_115)],
)
def test_stats_match_reference_values(name, flops, params):
    model, _ = create_model(resolve_model(name), 11, pretrained=False)
    stats = model_stats(model, 224, 11)
    assert (stats["flops"], stats["params"]) == (flops, params)
    assert stats["size_mb"] == pytest.approx(params * 4 / 2**20, abs=1e-4)


def test_family_alpha_is_exactly_timms_variant():
    spec = resolve_model("mobilenetv3_small", 0.5)
    assert spec.name == "mobilenetv3_small_050"
    model, _ = create_model(spec, 11, pretrained=False)
    assert count_params(model) == 579_499
    reference = timm.create_model("mobilenetv3_small_050", num_classes=11)
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]


@pytest.mark.parametrize("family", ["mobilenetv1", "mobilenetv2", "mobilenetv3_small", "mobilenetv3_large", "lcnet", "mnasnet", "ghostnet",
                                    "repghostnet"])
def test_every_family_builds_at_any_alpha_with_timm_rounding(family):
    registered = {0.5: f"{family}_050", 1.0: f"{family}_100"}
    for alpha, name in registered.items():
        if timm.is_model(name):  # the family generator at this alpha equals the registered variant
            ours = resolve_model(family, alpha)
            assert ours.name == name
    small, _ = create_model(resolve_model(family, 0.35), 11, pretrained=False)
    large, _ = create_model(resolve_model(family, 0.6), 11, pretrained=False)
    assert count_params(small) < count_params(large)


def test_unregistered_alpha_is_built_by_the_family_generator():
    spec = resolve_model("mobilenetv3_small", 0.6)
    assert spec.name == "mobilenetv3_small_alpha0.6" and spec.alpha == 0.6
    model, loaded = create_model(spec, 11, pretrained=True)
    assert not loaded  # no published weights at this width


def test_bad_model_requests_name_the_fix():
    with pytest.raises(ModelError, match="Closest: mobilenetv3_small"):
        resolve_model("mobilenetv3_smal")
    with pytest.raises(ModelError, match="> 0"):
        resolve_model("lcnet", 0)
    with pytest.raises(ModelError, match="family name"):
        resolve_model("lcnet_050", 0.5)


def test_offline_pretrained_falls_back_loudly(caplog):
    _, loaded = create_model(resolve_model("lcnet_050"), 11, pretrained=True)
    assert loaded is False
    assert [r.levelname for r in caplog.records if "starting from random init" in r.getMessage()] == ["WARNING"]


def test_local_weights_replace_a_mismatched_head(tmp_path):
    import torch

    source, _ = create_model(resolve_model("lcnet_050"), 5, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    target, _ = create_model(resolve_model("lcnet_050"), 11, pretrained=False)
    skipped = load_weights(target, str(tmp_path / "w.pth"))
    assert skipped == ["classifier.weight", "classifier.bias"]
    assert torch.equal(target.conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(ModelError, match="does not exist"):
        load_weights(target, str(tmp_path / "missing.pth"))


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub client online, but its endpoint a closed local port: the give-up path without any network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


def test_unreachable_hub_gives_up_fast_with_one_warning(unreachable_hub, monkeypatch, caplog):
    monkeypatch.setattr(factory, "cached_weights", lambda cfg: None)
    started = time.perf_counter()
    model, pretrained = create_model(resolve_model("mobilenetv3_small_050"), 11)
    assert time.perf_counter() - started < hub.HUB_TIMEOUT_S
    assert pretrained is False and count_params(model) == 579_499
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0] and "pretrained=False" in warnings[0]


def test_unreachable_hub_uses_cached_weights(unreachable_hub, monkeypatch, tmp_path):
    reference = timm.create_model("mobilenetv3_small_050", num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(factory, "cached_weights", lambda cfg: tmp_path / "pytorch_model.bin")
    model, pretrained = create_model(resolve_model("mobilenetv3_small_050"), 11)
    assert pretrained is True
    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight)
    assert model.get_classifier().out_features == 11


def test_offline_flag_is_never_probed(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("probed the network while offline"))
    assert hub.reachable(huggingface_hub.constants.ENDPOINT) is False


def test_cached_weights_finds_the_torch_hub_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "w-123.pth").write_bytes(b"x")
    assert hub.cached_weights({"url": "https://example.invalid/releases/w-123.pth"}) == tmp_path / "checkpoints" / "w-123.pth"
    assert hub.cached_weights({"url": "https://example.invalid/releases/other.pth"}) is None
