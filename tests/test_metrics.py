import math

import pytest
import torch
import torchvision

from cm.metrics import LPIPSDistance, get_distance_fn, l1, l2, l2_32, load_vgg16_into_lpips, pseudo_huber, pseudo_huber_c


def test_l1_l2_values():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.ones(2, 3, 4, 4)
    y[1] *= 2
    assert torch.allclose(l1(x, y), torch.tensor([1.0, 2.0]))
    assert torch.allclose(l2(x, y), torch.tensor([1.0, 4.0]))


def test_l2_32_resizes_bilinearly_to_32():
    x = torch.randn(2, 3, 64, 64)
    y = torch.randn(2, 3, 64, 64)
    rx = torch.nn.functional.interpolate(x, size=32, mode="bilinear")
    ry = torch.nn.functional.interpolate(y, size=32, mode="bilinear")
    assert torch.allclose(l2_32(x, y), ((rx - ry) ** 2).mean(dim=(1, 2, 3)))
    c = torch.full((1, 3, 8, 8), 0.5)
    assert torch.allclose(l2_32(c, -c), torch.tensor([1.0]))


def test_pseudo_huber_matches_ict():
    d = 3 * 32 * 32
    assert pseudo_huber_c(d) == pytest.approx(0.00054 * math.sqrt(d))
    x = torch.zeros(1, 3, 32, 32)
    y = torch.zeros(1, 3, 32, 32)
    y[0, 0, 0, 0] = 3.0
    y[0, 1, 0, 0] = 4.0
    c = 0.00054 * math.sqrt(d)
    assert pseudo_huber(x, y).item() == pytest.approx(math.sqrt(25 + c * c) - c, rel=1e-6)
    assert pseudo_huber(x, x).item() == 0.0
    # small differences behave like ||.||^2 / (2c), large like ||.||
    x64 = x.double()
    assert pseudo_huber(x64, x64 + 1e-6).item() == pytest.approx((1e-12 * d) / (2 * c), rel=1e-3)


@pytest.fixture(scope="module")
def random_lpips():
    return get_distance_fn("lpips", lpips_pretrained=False)


def test_lpips_with_random_backbone_is_zero_on_identical_images_and_positive_otherwise(random_lpips):
    dist = random_lpips
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(dist(x, x), torch.zeros(2), atol=1e-6)
    d = dist(x, x.flip(0))
    assert d.shape == (2,) and (d > 0).all()
    assert not any(p.requires_grad for p in dist.parameters())


def test_lpips_loads_a_local_vgg16_file(tmp_path, random_lpips):
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    load_vgg16_into_lpips(random_lpips.model, str(path))
    assert torch.equal(random_lpips.model.net.slice1._modules["0"].weight, features[0].weight)
    assert torch.equal(random_lpips.model.net.slice5._modules["28"].weight, features[28].weight)


def test_lpips_rejects_a_file_that_is_not_vgg16(tmp_path, random_lpips):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        load_vgg16_into_lpips(random_lpips.model, str(path))


def test_missing_lpips_weights_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.delenv("CM_LPIPS_VGG_PATH", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--lpips_vgg_path") as info:
        LPIPSDistance(vgg_path=str(tmp_path / "missing.pth"))
    assert "CM_LPIPS_VGG_PATH" in str(info.value)


def test_unknown_loss_norm():
    with pytest.raises(ValueError, match="unknown loss_norm 'l0'; allowed: l1, l2, l2-32, lpips, pseudo-huber"):
        get_distance_fn("l0")


def test_lpips_weights_are_found_through_the_environment(tmp_path, monkeypatch):
    from cm.metrics import _vgg16_path

    path = tmp_path / "vgg.pth"
    path.write_bytes(b"x")
    monkeypatch.setenv("CM_LPIPS_VGG_PATH", str(path))
    assert _vgg16_path(None) == str(path)
    assert _vgg16_path(str(path)) == str(path)
