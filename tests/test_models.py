"""timm factory, width multiplier parity and the published cost reference values."""
from __future__ import annotations

import pytest
import timm

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


@pytest.mark.parametrize("family", ["mobilenetv1", "mobilenetv2", "mobilenetv3_small", "mobilenetv3_large", "lcnet", "mnasnet", "ghostnet", "repghostnet"])
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


def test_offline_pretrained_falls_back_loudly(capsys):
    _, loaded = create_model(resolve_model("lcnet_050"), 11, pretrained=True)
    assert loaded is False
    assert "WARNING" in capsys.readouterr().err


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
