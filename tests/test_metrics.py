import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
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


def avgpool_lpips_by_hand(dist, x, y):
    """piq's LPIPS(replace_pooling=True, reduction="none") written out, with dist's backbone and linear heads:
    torchvision VGG16 features with every max-pool a 2x2 average pool, [0, 1] images standardised with the
    ImageNet mean and std, relu1_2 .. relu5_3 unit-normalised over channels, squared differences times the
    head weights averaged over space, summed over channels and layers."""
    layers = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    layers = nn.Sequential(*[nn.AvgPool2d(2, 2) if isinstance(m, nn.MaxPool2d) else m for m in layers])
    with torch.no_grad():
        for name, param in dist.model.net.named_parameters():
            _, index, kind = name.split(".")
            getattr(layers[int(index)], kind).copy_(param)
    heads = [lin.model[-1].weight.view(1, -1, 1, 1) for lin in dist.model.lins]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def features(img):
        h = ((F.interpolate(img, size=224, mode="bilinear") + 1) / 2 - mean) / std
        out = []
        for i, layer in enumerate(layers):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h / (torch.sqrt(torch.sum(h**2, dim=1, keepdim=True)) + 1e-10))
        return out

    with torch.no_grad():
        pairs = zip(features(x), features(y), heads)
        return sum(((a - b) ** 2 * w).mean(dim=(2, 3)).sum(dim=1) for a, b, w in pairs)


def _cpu_autocast_works(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.fixture(scope="module")
def lpips_pair_and_expected(random_lpips):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    y = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    return x, y, avgpool_lpips_by_hand(random_lpips, x, y)


def test_lpips_backbone_has_average_pools_only(random_lpips):
    modules = list(random_lpips.model.net.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in modules)
    pools = [m for m in modules if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 4 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)


@pytest.mark.parametrize(
    "autocast",
    [
        None,
        torch.bfloat16,
        pytest.param(
            torch.float16,
            marks=pytest.mark.skipif(not _cpu_autocast_works(torch.float16), reason="this torch has no CPU fp16 autocast"),
        ),
    ],
)
def test_lpips_equals_average_pool_lpips_built_by_hand(random_lpips, lpips_pair_and_expected, autocast):
    x, y, expected = lpips_pair_and_expected
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None), torch.no_grad():
        got = random_lpips(x, y)
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got, expected)


def test_lpips_of_half_precision_inputs_is_float32_and_differentiable(random_lpips):
    x = (torch.rand(1, 3, 8, 8) * 2 - 1).bfloat16().requires_grad_(True)
    y = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = random_lpips(x, y)
    d.sum().backward()
    assert d.dtype == torch.float32 and x.grad is not None and torch.isfinite(x.grad).all()
