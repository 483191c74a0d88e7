"""SSD detectors: output sizes match their priors, mean subtraction inside, fixed input size, checkpoints,
and ImageNet backbone loading from torchvision-format files (no torchvision needed)."""
import pytest
import torch

from robustlab.detection.boxes import TINYSSD_96, make_priors
from robustlab.detection.models import IMAGENET_STD, anchors_per_location, load_imagenet_backbone
from robustlab.engine.checkpoint import load_model, save_model
from robustlab.models import create_model


@pytest.mark.parametrize("name,size,priors", [("tinyssd-96", 96, 866), ("tinyssd-128", 128, 1524),
                                              ("ssd300-vgg16", 300, 8732), ("ssd300-resnet50", 300, 8732)])
def test_output_length_equals_prior_count(name, size, priors):
    m = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        loc, conf = m(torch.rand(1, 3, size, size) * 255)
    assert loc.shape == (1, priors, 4) and conf.shape == (1, priors, 4) and m.priors.shape == (priors, 4)


def test_anchors_per_location_and_tinyssd_size():
    assert anchors_per_location(TINYSSD_96["aspect_ratios"]) == [4, 6, 6, 4, 4]
    m = create_model("tinyssd-96", num_classes=10)
    assert 0.5e6 < sum(p.numel() for p in m.parameters()) < 0.65e6  # spec: about 0.57 M
    assert torch.equal(m.priors, make_priors(**TINYSSD_96))


def test_mean_is_subtracted_inside_the_model():
    m = create_model("tinyssd-96", num_classes=2, mean=[10.0, 20.0, 30.0]).eval()
    x = torch.rand(2, 3, 96, 96) * 255
    with torch.no_grad():
        loc, conf = m(x)
        m.mean.zero_()
        loc2, conf2 = m(x - torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1))
    assert torch.allclose(loc, loc2, atol=1e-4) and torch.allclose(conf, conf2, atol=1e-4)


def test_fixed_size_models_reject_other_sizes():
    m = create_model("tinyssd-96", num_classes=2)
    with pytest.raises(ValueError, match="96x96"):
        m(torch.rand(1, 3, 100, 100))
    with pytest.raises(ValueError, match="RGB"):
        m(torch.rand(1, 1, 96, 96))
    with pytest.raises(ValueError, match="fixed-size"):
        create_model("tinyssd-96", input_size=128)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("tinyssd-96", num_classes=0)


def test_checkpoint_round_trip_keeps_mean_and_class_names(tmp_path):
    m = create_model("tinyssd-96", num_classes=3, mean=[1.0, 2.0, 3.0], class_names=["a", "b", "c"]).eval()
    save_model(tmp_path / "d.safetensors", m)
    back, _ = load_model(tmp_path / "d.safetensors")
    x = torch.rand(1, 3, 96, 96) * 255
    with torch.no_grad():
        assert torch.equal(m(x)[1], back(x)[1])
    assert back.class_names == ["a", "b", "c"] and back.mean.flatten().tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("name,first", [("ssd300-vgg16", "features.0.weight"), ("ssd300-resnet50", "conv1.weight")])
def test_imagenet_backbone_loader(tmp_path, name, first):
    src = create_model(name, num_classes=2)
    state = {k: v.clone() for k, v in src.backbone.state_dict().items()
             if not k.startswith(("extras.", "fc.", "l2norm."))}
    torch.save(state, tmp_path / "imagenet.pth")  # torchvision key layout
    dst = create_model(name, num_classes=2)
    loaded = load_imagenet_backbone(dst, tmp_path / "imagenet.pth")
    assert first in loaded
    scale = (255.0 * torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    assert torch.allclose(dst.backbone.state_dict()[first], state[first] / scale)
    other = [k for k in loaded if k != first and k.endswith("weight")][0]
    assert torch.equal(dst.backbone.state_dict()[other], state[other])
    del state[other]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        load_imagenet_backbone(dst, tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError):
        load_imagenet_backbone(dst, tmp_path / "nope.pth")
