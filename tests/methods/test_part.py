"""PART (part.md 11): class activation maps, the mask pipeline, Pixel-AG, the three methods' reductions to
their base methods, the mask-refresh schedule, and bad input."""
import pytest
import torch
from torch import nn

from robustlab.attacks import create_attack
from robustlab.attacks.cam import class_activation_maps, find_module
from robustlab.attacks.pixel_ag import PixelAG, budget_map, importance_mask, part_budget
from robustlab.methods import Batch, StepContext, create_method
from robustlab.models.classifiers import create_model


class Toy(nn.Module):
    """conv -> ReLU ('act') -> global average pool -> linear: the known-answer CAM network."""

    def __init__(self, k=3, ch=4):
        super().__init__()
        self.conv = nn.Conv2d(1, ch, 3, padding=1)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm1d(ch)
        self.fc = nn.Linear(ch, k)

    def forward(self, x):
        a = self.act(self.conv(x))
        return self.fc(self.bn(a.mean(dim=(2, 3))))


def _manual_cam(model, x, method, cls):
    """Per-sample CAM by hand: activation and gradient of one sample at a time."""
    model.eval()
    out = []
    for i in range(x.shape[0]):
        store = {}
        h = model.act.register_forward_hook(lambda m, inp, o, store=store: store.setdefault("a", o))
        z = model(x[i:i + 1].requires_grad_(True))
        h.remove()
        a = store["a"]
        (g,) = torch.autograd.grad(z[0, cls[i]], a)
        a, g = a[0].detach(), g[0]
        if method == "gradcam":
            cam = torch.relu((g.mean((1, 2))[:, None, None] * a).sum(0))
        elif method == "xgradcam":
            s = a.sum((1, 2))
            w = torch.stack([(g[k] * a[k]).sum() / s[k] if s[k] != 0 else torch.tensor(0.0) for k in range(a.shape[0])])
            cam = torch.relu((w[:, None, None] * a).sum(0))
        else:
            cam = torch.relu((torch.relu(g) * a).sum(0))
        lo, hi = cam.min(), cam.max()
        out.append((cam - lo) / (hi - lo) if hi > lo else torch.zeros_like(cam))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "layercam"])
def test_batch_cam_equals_the_per_sample_hand_computation(method):
    torch.manual_seed(0)
    model = Toy()
    x = torch.rand(5, 1, 6, 6)
    with torch.no_grad():
        model.eval()
        pred = model(x).argmax(1)
    cam = class_activation_maps(model, x, "act", method)
    assert cam.shape == (5, 6, 6) and cam.min() >= 0 and cam.max() <= 1
    assert torch.allclose(cam, _manual_cam(model, x, method, pred), atol=1e-5)
    given = torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(class_activation_maps(model, x, "act", method, classes=given),
                          _manual_cam(model, x, method, given), atol=1e-5)


def test_known_answer_gradcam_is_the_channel_map_and_the_mask_selects_the_blob():
    """Last conv output = a one-hot spatial blob in channel 0; head = GAP + linear: GradCAM of the predicted
    class is that channel, normalised, and the z-score mask is the upsampled blob."""

    class Blob(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Identity()
            self.fc = nn.Linear(2, 2)
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
                self.fc.bias.zero_()

        def forward(self, x):
            a = torch.zeros(x.shape[0], 2, 4, 4) + 0 * x.mean()  # keep the graph to x
            a[:, 0, 1, 2] = 1.0 + x.mean()  # the blob
            return self.fc(self.feat(a).mean(dim=(2, 3)))

    model = Blob()
    x = torch.full((2, 1, 16, 16), 0.5)
    cam = class_activation_maps(model, x, "feat")
    want = torch.zeros(4, 4)
    want[1, 2] = 1
    assert torch.allclose(cam, want.expand(2, 4, 4))
    mask = importance_mask(cam, (1, 16, 16))
    ys, xs = mask[0, 0].nonzero(as_tuple=True)
    assert 0 < mask[0, 0].float().mean() < 0.2
    # centred on the blob's cell (CAM row 1, col 2 -> image rows 4-7, cols 8-11)
    assert ys.float().mean() == pytest.approx(5.5, abs=0.5) and xs.float().mean() == pytest.approx(9.5, abs=0.5)
    assert ys.min() >= 3 and ys.max() <= 8 and xs.min() >= 7 and xs.max() <= 12


def test_cam_restores_hooks_modes_and_grads_even_when_it_raises():
    torch.manual_seed(0)
    model = Toy().train()
    model.fc.weight.requires_grad_(False)
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    class_activation_maps(model, torch.rand(3, 1, 6, 6), "act")
    assert model.training and model.bn.training
    assert not model.fc.weight.requires_grad and model.conv.weight.requires_grad
    assert torch.equal(model.conv.weight.grad, torch.ones_like(model.conv.weight)) and model.fc.bias.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics untouched (eval mode inside)
    assert not model.act._forward_hooks

    class Boom(Toy):
        def forward(self, x):
            self.act(self.conv(x))  # the hook fires, then the model fails
            raise RuntimeError("boom")

    bad = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        class_activation_maps(bad, torch.rand(2, 1, 6, 6), "act")
    assert bad.training and not bad.act._forward_hooks and all(p.requires_grad for p in bad.parameters())


def test_cam_bad_inputs():
    model = Toy()
    with pytest.raises(ValueError, match="valid layer names: .*conv.*act"):
        class_activation_maps(model, torch.rand(1, 1, 6, 6), "layer9")
    with pytest.raises(ValueError, match="unknown CAM method 'scorecam'"):
        class_activation_maps(model, torch.rand(1, 1, 6, 6), "act", "scorecam")
    with pytest.raises(ValueError, match="valid layer names"):
        find_module(model, "")


def test_budget_map_values_channels_and_fractions():
    torch.manual_seed(0)
    cam = torch.rand(4, 4, 4)
    cam[3] = 0.5  # constant
    mask = importance_mask(cam, (3, 32, 32))
    e = budget_map(mask, 8 / 255, 7 / 255)
    assert e.shape == (4, 3, 32, 32)
    assert set(e.unique().tolist()) <= {torch.tensor(8 / 255).item(), torch.tensor(7 / 255).item()}
    assert (mask == mask[:, :1]).all()  # zscore: every channel of a pixel agrees
    frac = mask.float().mean((1, 2, 3))
    assert ((frac[:3] > 0) & (frac[:3] < 1)).all() and frac[3] == 0


def test_official_jet_mask_differs_across_channels_and_needs_rgb():
    torch.manual_seed(0)
    cam = torch.rand(8, 4, 4)
    mask = importance_mask(cam, (3, 32, 32), mode="official_jet")
    assert not (mask == mask[:, :1]).all()
    frac = mask.float().mean((0, 2, 3))  # per channel R, G, B
    assert frac[2] > frac[0]  # part.md 3.5: blue gets the full eps far more often than red
    with pytest.raises(ValueError, match="3-channel"):
        importance_mask(cam, (1, 32, 32), mode="official_jet")


def test_pixel_ag_stays_in_the_per_element_box_and_reduces_to_pgd():
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, input_size=28, width=4, hidden=16).eval()
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    atk = PixelAG(model, eps=0.3, eps_low=0.1, steps=5, step_size=0.05, cam_layer="body.8")
    e = atk.budget_for(x)
    x_adv = atk(x, y)
    assert ((x_adv - x).abs() <= e + 1e-7).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    low = e == 0.1
    assert low.any() and ((x_adv - x).abs()[low] <= 0.1 + 1e-7).all()
    # robustlab's own start (uniform in the box, clipped): with eps_low = eps, Pixel-AG is PGD bit for bit
    same = PixelAG(model, eps=0.3, eps_low=0.3, steps=5, step_size=0.05, cam_layer="body.8", start="budget")(x, y)
    ref = create_attack("pgd", model, norm="linf", eps=0.3, steps=5, step_size=0.05)(x, y)
    assert torch.equal(same, ref)
    fixed = torch.full((1, 28, 28), 0.05)
    fixed[:, :14, :14] = 0.2  # a user-given map (the seed's quadrant experiment)
    x_fix = PixelAG(model, budget=fixed, steps=3, step_size=0.05)(x, y)
    assert ((x_fix - x).abs() <= fixed + 1e-7).all()


def test_pixel_ag_starts_as_the_official_code_with_the_scalar_eps_unclipped():
    """part.md 4.1 / 12.6: x_0 = x + U(-eps, eps) element-wise with the scalar eps (not the budget map E) and no
    clipping before the first gradient; the first step then projects into |delta| <= E and [0, 1]."""
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, input_size=28, width=4, hidden=16).eval()
    x = torch.rand(4, 1, 28, 28)
    x[:, :, :4] = 0.0  # saturated pixels: an unclipped start leaves [0, 1] there
    y = torch.randint(0, 10, (4,))
    budget = torch.full((1, 28, 28), 0.1)
    budget[:, 10:20, 10:20] = 0.3  # eps_low 0.1 < eps 0.3 on most pixels
    seen = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    x_adv = PixelAG(model, eps=0.3, eps_low=0.1, budget=budget, steps=1, step_size=0.0, seed=3)(x, y)
    hook.remove()
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    x0 = x + (2 * u - 1) * 0.3
    assert torch.equal(seen[0], x0)  # the first gradient is taken at the unclipped start
    assert seen[0].min() < 0 and ((seen[0] - x).abs() > 0.1).any()  # outside the box and beyond eps_low
    assert torch.allclose(x_adv, (x + (x0 - x).clamp(-budget, budget)).clamp(0, 1))
    assert ((x_adv - x).abs() <= budget + 1e-7).all() and x_adv.min() >= 0
    # PART trains with the same start after burn-in (and plain PGD-AT's during it)
    part = create_method("part", eps=0.3, eps_low=0.1, steps=1, step_size=0.0, burn_in_epochs=1)
    assert part.start_point(StepContext(0, 0, torch.Generator())) is None
    start = part.start_point(StepContext(1, 0, torch.Generator()))
    assert torch.equal(start(x, torch.Generator().manual_seed(3)), x0)
    assert create_method("part", start="budget", burn_in_epochs=0).start_point(StepContext(1, 0, torch.Generator())) is None


@pytest.mark.parametrize("part,base,kw", [("part", "pgd-at", {"step_size": 0.05, "start": "budget"}),
                                          ("part-t", "trades", {"step_size": 0.05}),
                                          ("part-m", "mart", {"step_size": 0.05})])
def test_with_eps_low_equal_eps_each_method_is_its_base_method(part, base, kw):
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, input_size=28, width=4, hidden=16)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    kw = dict(kw)
    start = {"start": kw.pop("start")} if "start" in kw else {}  # robustlab's start: the reduction is exact
    common = dict(eps=0.3, steps=3, **kw)
    a = create_method(part, eps_low=0.3, burn_in_epochs=0, **common, **start)
    b = create_method(base, **common)
    la = a.loss(model, Batch(x, y), StepContext(0, 0, torch.Generator().manual_seed(1)))
    lb = b.loss(model, Batch(x, y), StepContext(0, 0, torch.Generator().manual_seed(1)))
    assert torch.equal(la.loss, lb.loss)
    c = create_method(part, eps_low=0.1, burn_in_epochs=0, **common, **start)
    lc = c.loss(model, Batch(x, y), StepContext(0, 0, torch.Generator().manual_seed(1)))
    assert not torch.equal(lc.loss, lb.loss)  # the reweighted budget changes the inner attack


@pytest.mark.parametrize("s,want", [(10, [1, 10, 20, 30, 40, 50, 60]), (1, list(range(1, 61)))])
def test_masks_are_refreshed_after_burn_in_and_every_s_epochs(s, want):
    model = create_model("small-cnn", in_channels=1, input_size=28, width=2, hidden=8)
    m = create_method("part", eps=0.3, eps_low=0.2, burn_in_epochs=20, refresh_epochs=s)
    x = torch.rand(2, 1, 28, 28)
    for epoch in range(80):
        for step in range(2):
            threat, _ = m.batch_threat(model, x, StepContext(epoch, step, torch.Generator()))
            if epoch < 20:
                assert not isinstance(threat.eps, torch.Tensor)  # burn-in: the uniform budget
    assert m.refreshed_at == want


def test_mask_model_survives_a_checkpoint_round_trip():
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, input_size=28, width=2, hidden=8)
    m = create_method("part", eps=0.3, eps_low=0.2, burn_in_epochs=0, refresh_epochs=10)
    x = torch.rand(2, 1, 28, 28)
    e1 = m.batch_threat(model, x, StepContext(0, 0, torch.Generator()))[0].eps
    saved = m.state_tensors()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # training moved on; the snapshot must not
    m2 = create_method("part", eps=0.3, eps_low=0.2, burn_in_epochs=0, refresh_epochs=10)
    m2.load_state_tensors(saved)
    e2 = m2.batch_threat(model, x, StepContext(3, 0, torch.Generator()))[0].eps  # not a refresh epoch
    assert torch.equal(e1, e2)


def test_bad_inputs_give_clear_errors():
    model = create_model("small-cnn", in_channels=1, input_size=28, width=2, hidden=8)
    with pytest.raises(ValueError, match=r"eps_low \(0.4\) must not exceed eps"):
        create_method("part", eps=0.3, eps_low=0.4)
    with pytest.raises(ValueError, match="unknown CAM method 'scorecam'"):
        create_method("part-t", cam_method="scorecam")
    with pytest.raises(ValueError, match="mask_mode"):
        create_method("part-m", mask_mode="jet")
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="budget map has shape"):
        PixelAG(model, budget=torch.full((1, 14, 14), 0.1))(x, y)
    with pytest.raises(ValueError, match="valid layer names"):
        part_budget(model, x, 0.3, 0.2, layer="body.99")
    with pytest.raises(TypeError, match="boolean"):
        budget_map(torch.ones(1, 1, 2, 2), 0.3, 0.2)


def test_the_mask_model_is_a_frozen_snapshot_without_the_trainers_hooks():
    from robustlab.methods.part import frozen_copy

    model = create_model("small-cnn", in_channels=1, input_size=28, width=2, hidden=8).train()
    calls = []
    model.register_forward_pre_hook(lambda m, inp: calls.append(1))  # e.g. the Trainer's pass counter
    snap = frozen_copy(model)
    x = torch.rand(2, 1, 28, 28)
    snap(x)
    assert not calls and not snap.training and not any(p.requires_grad for p in snap.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()
    assert torch.equal(model(x), snap(x))


def test_batch_index_takes_the_masks_of_the_other_pass_of_the_last_refresh(mnist_cnn, mnist):
    """mask_alignment="batch_index" (the official code, part.md 8): batch i of an epoch is attacked with the masks of
    batch i of the second pass made at the last refresh, not with its own (a trained CNN: its maps differ per
    digit)."""
    x = mnist.x_test[:3]
    others, asked = {}, []

    def other_pass(epoch, step):
        asked.append((epoch, step))
        return others.setdefault((epoch, step), mnist.x_test[10 + 3 * len(others):13 + 3 * len(others)])

    m = create_method("part", eps=0.3, eps_low=0.2, burn_in_epochs=2, refresh_epochs=10, mask_alignment="batch_index")
    own = create_method("part", eps=0.3, eps_low=0.2, burn_in_epochs=2, refresh_epochs=10)
    for epoch, step in ((2, 0), (2, 1), (13, 1)):  # PART epochs 1, 1 and 12 (last refresh: PART epoch 10)
        ctx = StepContext(epoch, step, torch.Generator(), other_pass=other_pass)
        got = m.batch_threat(mnist_cnn, x, ctx)[0].eps
        theirs = own.batch_threat(mnist_cnn, others[asked[-1]], StepContext(epoch, step, torch.Generator()))[0].eps
        assert torch.equal(got, theirs) and not torch.equal(got, own.batch_threat(mnist_cnn, x, ctx)[0].eps)
    assert asked == [(2, 0), (2, 1), (11, 1)]  # global epoch 11 = PART epoch 10


def test_batch_index_trains_on_data_in_memory_and_refuses_streamed_data(tmp_path):
    from robustlab.data.standins import write_standin
    from robustlab.engine.config import TrainConfig
    from robustlab.engine.trainer import Trainer
    from robustlab.errors import ConfigError

    kw = dict(out_dir=str(tmp_path), model="small-cnn", model_kwargs={"width": 2, "hidden": 8}, method="part",
              method_kwargs={"eps": 0.1, "eps_low": 0.05, "steps": 2, "step_size": 0.05, "burn_in_epochs": 0,
                             "mask_alignment": "batch_index"},
              epochs=1, batch_size=64, validation=0, select_best=False, eval_samples=16, progress=False)
    trainer = Trainer(TrainConfig(name="mem", dataset="mnist5k", **{**kw, "batch_size": 512}))
    a, b = trainer._other_pass(0, 1), trainer._other_pass(0, 1)
    assert torch.equal(a, b) and a.shape[0] == 512  # a function of (seed, epoch, step)
    assert not torch.equal(a, trainer._other_pass(0, 2))
    trainer.fit()
    assert trainer.history[0]["epoch"] == 1
    stream = write_standin("tiny-imagenet", tmp_path / "data", 16, 4, 0)
    with pytest.raises(ConfigError, match="batch_index"):
        Trainer(TrainConfig(name="files", dataset="tiny-imagenet", dataset_kwargs={"root": stream["root"]},
                            **{**kw, "model_kwargs": {"width": 2, "hidden": 8}}))
