"""Trainer: resume equals an uninterrupted run, checkpoints refuse corruption, pass accounting, schedules,
catastrophic-overfitting detection, config validation."""
import pytest
import torch

from robustlab.data.augment import augment
from robustlab.engine.checkpoint import CheckpointError, load_model
from robustlab.engine.config import ConfigError, TrainConfig, config_from_dict, load_config
from robustlab.engine.trainer import Trainer, lr_factor
from tests.conftest import require


def _cfg(tmp_path, **kw):
    base = dict(name="t", dataset="digits", model="mlp", model_kwargs={"hidden": 32, "depth": 1}, epochs=3,
                batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="multistep",
                eval_samples=64, eval_attack="pgd:eps=0.1,steps=3", out_dir=str(tmp_path), seed=1,
                deterministic=True, method="pgd-at", method_kwargs={"eps": 0.1, "steps": 2, "step_size": 0.05})
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_kill_is_bit_exact(tmp_path):
    full = Trainer(_cfg(tmp_path / "a"))
    full.fit()
    killed = Trainer(_cfg(tmp_path / "b"))
    spe = killed.steps_per_epoch()
    with pytest.raises(KeyboardInterrupt):
        killed.fit(stop_at_step=spe + 3)  # mid-epoch 2: the last checkpoint is the end of epoch 1
    resumed = Trainer(_cfg(tmp_path / "b"))
    resumed.fit(resume=True)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


@pytest.mark.parametrize("method,kwargs", [("pgd-at", {"eps": 0.1, "steps": 2, "step_size": 0.05}),
                                            ("free-at", {"eps": 0.1, "replays": 2})])
def test_a_state_within_the_epoch_resumes_bit_exactly(tmp_path, method, kwargs):
    """checkpoint_every=3 steps (issue 31): stopped at step 5 of epoch 2, the run resumes from the state written
    after its step 3 (not from the end of epoch 1) and ends with the uninterrupted run's weights and epoch rows; with
    keep_last=2 the state before it is kept too."""
    kw = dict(method=method, method_kwargs=kwargs, checkpoint_every=3, keep_last=2)
    full = Trainer(_cfg(tmp_path / "a", **kw))
    full.fit()
    part = Trainer(_cfg(tmp_path / "b", **kw))
    spe = part.steps_per_epoch()
    assert spe >= 6
    with pytest.raises(KeyboardInterrupt):
        part.fit(stop_at_step=(spe + 5) * part.method.steps_per_batch())
    assert part.saved_at == "epoch 2, step 3"
    state = tmp_path / "b" / "t" / "train_state.safetensors"
    assert state.with_suffix(".1.safetensors").exists()  # keep_last=2: the state before
    resumed = Trainer(_cfg(tmp_path / "b", **kw))
    resumed.load_state(state)
    assert resumed._epoch_progress is not None and resumed._epoch_progress["step"] == 3
    resumed = Trainer(_cfg(tmp_path / "b", **kw))
    resumed.fit(resume=True)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in full.history]


def test_checkpoint_every_is_checked():
    for bad in (0, "30x", "-5m", True):
        with pytest.raises(ConfigError, match="checkpoint_every"):
            TrainConfig(checkpoint_every=bad)
    with pytest.raises(ConfigError, match="keep_last"):
        TrainConfig(keep_last=0)
    assert TrainConfig(checkpoint_every="90s").checkpoint_every == "90s" and TrainConfig(checkpoint_every=None)


def test_free_at_state_survives_resume(tmp_path):
    kw = dict(method="free-at", method_kwargs={"eps": 0.1, "replays": 2}, epochs=2)
    full = Trainer(_cfg(tmp_path / "a", **kw))
    full.fit()
    part = Trainer(_cfg(tmp_path / "b", **kw))
    with pytest.raises(KeyboardInterrupt):
        part.fit(stop_at_step=part.steps_per_epoch() * 2 + 2)
    resumed = Trainer(_cfg(tmp_path / "b", **kw))
    resumed.fit(resume=True)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_corrupt_training_state_refused(tmp_path):
    t = Trainer(_cfg(tmp_path, epochs=1))
    t.fit()
    state = tmp_path / "t" / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Trainer(_cfg(tmp_path, epochs=2)).fit(resume=True)


def test_resume_with_a_different_method_refused(tmp_path):
    Trainer(_cfg(tmp_path, epochs=1)).fit()
    with pytest.raises(CheckpointError, match="'method'"):
        Trainer(_cfg(tmp_path, epochs=2, method="standard", method_kwargs={})).fit(resume=True)


def test_resume_without_state(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(_cfg(tmp_path)).fit(resume=True)


def test_outputs_and_best_checkpoint(tmp_path):
    t = Trainer(_cfg(tmp_path, epochs=2))
    res = t.fit()
    run = tmp_path / "t"
    for f in ("best.safetensors", "last.safetensors", "train_state.safetensors", "metrics.jsonl", "metrics.csv",
              "config.json"):
        assert (run / f).exists(), f
    model, extra = load_model(run / "best.safetensors")
    assert extra["epoch"] == res["best"]["epoch"]
    assert res["best"]["metric"] == "robust_accuracy"
    assert res["best"]["score"] == max(h["eval_robust"] for h in res["history"])


@pytest.mark.parametrize("method,kw,fwd,bwd", [
    ("standard", {}, 1, 1),
    ("pgd-at", {"eps": 0.1, "steps": 3}, 4, 4),  # 3 attack fwd+bwd, 1 training fwd+bwd
    ("fgsm-at", {"eps": 0.1}, 3, 3),  # 1 attack, then clean + adversarial in one training pass
    ("fast-at", {"eps": 0.1}, 2, 2),
    ("free-at", {"eps": 0.1, "replays": 3}, 3, 3),  # m replays, one backward each
    ("trades", {"eps": 0.1, "steps": 3}, 6, 5),  # clean target fwd, 3 attack fwd+bwd, clean+adv training
    ("mart", {"eps": 0.1, "steps": 3}, 6, 5),
    ("vat", {"eps": 1.0}, 4, 3),  # target fwd, 1 power iteration fwd+bwd, clean+vadv training
])
def test_passes_per_image(tmp_path, method, kw, fwd, bwd):
    t = Trainer(_cfg(tmp_path, method=method, method_kwargs=kw, epochs=1, deterministic=False))
    row = t.fit()["history"][0]
    assert row["forward_per_image"] == pytest.approx(fwd)
    assert row["backward_per_image"] == pytest.approx(bwd)


def test_free_at_steps_per_epoch_and_persistent_delta(tmp_path):
    t = Trainer(_cfg(tmp_path, method="free-at", method_kwargs={"eps": 0.1, "replays": 3}, epochs=1))
    t.fit()
    assert t.global_step == 3 * t.steps_per_epoch()
    assert t.method.delta is not None and t.method.delta.abs().max() <= 0.1 + 1e-7


def test_catastrophic_overfitting_is_reported(tmp_path):
    t = Trainer(_cfg(tmp_path, epochs=2))
    t.history = [{"epoch": 1, "eval_robust": 0.6}]
    row = {"epoch": 2, "eval_robust": 0.1, "eval_attack": "pgd"}
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting"):
        t._check_overfitting(row)
    assert row["catastrophic_overfitting"] and t.events


def test_lr_schedules():
    c = TrainConfig(epochs=10, schedule="multistep", milestones=(5, 8), gamma=0.1)
    assert lr_factor(c, 0, 100) == 1 and lr_factor(c, 50, 100) == pytest.approx(0.1)
    assert lr_factor(c, 85, 100) == pytest.approx(0.01)
    cyc = TrainConfig(epochs=10, schedule="cyclic")
    assert lr_factor(cyc, 49, 100) == pytest.approx(1.0) and lr_factor(cyc, 0, 100) == pytest.approx(0.02)
    cos = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(cos, 100, 100) == pytest.approx(0, abs=1e-12)


def test_milestones_mean_one_thing():
    """Integers are epochs (1 = after the first epoch, not the end of training), floats fractions in (0, 1);
    ambiguous, negative, mixed and decreasing milestones are refused before training (issue 31)."""
    from robustlab.engine.config import load_config
    from robustlab.errors import ConfigError

    epochs = TrainConfig(epochs=3, schedule="multistep", milestones=(1, 2), gamma=0.1)
    assert [round(lr_factor(epochs, s, 30), 6) for s in (0, 9, 10, 19, 20, 29)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    fractions = TrainConfig(epochs=3, schedule="multistep", milestones=(0.5,), gamma=0.1)
    assert lr_factor(fractions, 14, 30) == 1 and lr_factor(fractions, 15, 30) == pytest.approx(0.1)
    for bad, match in (("[1.0, 2]", "all integers"), ("[2.5]", "write 2, not 2.0"), ("[-1]", ">= 1"),
                       ("[0.75, 0.5]", "strictly increasing"), ("[3, 3]", "strictly increasing"),
                       ("[0, 0.5]", "all integers")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"milestones={bad}", "schedule=multistep"])


def test_augment_shapes_and_determinism():
    x = torch.rand(6, 3, 8, 8)
    a = augment(x, "crop-flip", torch.Generator().manual_seed(0))
    b = augment(x, "crop-flip", torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'epochz'"):
        config_from_dict({"epochz": 3})
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        config_from_dict({"epochs": "three"})
    with pytest.raises(ConfigError, match="'lr'"):
        config_from_dict({"lr": -1.0})
    with pytest.raises(ConfigError, match="'optimizer' must be one of"):
        config_from_dict({"optimizer": "rmsprop"})
    p = tmp_path / "c.yaml"
    p.write_text("epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_shipped_configs_are_valid():
    import pathlib

    files = sorted(pathlib.Path(__file__).resolve().parents[2].joinpath("configs").rglob("*.yaml"))  # every folder
    assert files
    for f in files:
        cfg = load_config(f)
        from robustlab.methods import create_method

        create_method(cfg.method, **cfg.method_kwargs)


def test_best_checkpoint_breaks_robust_ties_by_clean_accuracy(tmp_path):
    # an unbounded evaluation attack: robust accuracy ties at 0 every epoch, clean accuracy decides
    t = Trainer(_cfg(tmp_path, epochs=3, eval_attack="pgd:eps=1.0,steps=5"))
    res = t.fit()
    evals = [(h["eval_robust"], h["eval_clean"]) for h in res["history"]]
    assert all(e[0] == 0 for e in evals)
    assert (res["best"]["score"], res["best"]["clean"]) == max(evals)


def test_standard_training_is_selected_by_clean_accuracy_on_the_validation_split(tmp_path):
    """A method with no robustness goal keeps its most accurate epoch, and every per-epoch evaluation (so the
    selection) runs on validation images carved from the training split, never on the test images."""
    t = Trainer(_cfg(tmp_path, method="standard", method_kwargs={}, epochs=3, validation=100))
    full = Trainer(_cfg(tmp_path / "no-val", method="standard", method_kwargs={}, epochs=1, validation=0,
                        select_best=False))
    assert t.data.n_train == full.data.n_train - 100 and torch.equal(t.data.x_test, full.data.x_test)
    x_val, _ = t.validation
    assert x_val.shape[0] == 100
    # validation images come from the training split and are no longer trained on
    train_rows = {tuple(r.tolist()) for r in t.data.x_train.flatten(1)}
    test_rows = {tuple(r.tolist()) for r in t.data.x_test.flatten(1)}
    val_rows = [tuple(r.tolist()) for r in x_val.flatten(1)]
    assert not any(r in train_rows for r in val_rows) and not any(r in test_rows for r in val_rows)
    res = t.fit()
    assert res["best"]["metric"] == "clean_accuracy" and "validation (100" in res["best"]["split"]
    assert all(h["eval_split"] == "validation" for h in res["history"])
    best = max(res["history"], key=lambda h: h["eval_clean"])  # the first epoch with the best clean accuracy
    assert res["best"]["epoch"] == best["epoch"] and res["best"]["score"] == best["eval_clean"]
    # the split is fixed by validation_seed, not by the run seed
    other = Trainer(_cfg(tmp_path / "s2", method="standard", method_kwargs={}, seed=7, validation=100))
    assert torch.equal(other.validation[0], x_val)


def test_selection_without_a_validation_split_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="select_best needs a validation split"):
        _cfg(tmp_path, validation=0)
    with pytest.raises(ConfigError, match="validation"):
        _cfg(tmp_path, validation=1.5)
    with pytest.raises(ConfigError, match="holds out"):
        Trainer(_cfg(tmp_path, validation=100000))
    t = Trainer(_cfg(tmp_path, validation=0, select_best=False, epochs=1))
    res = t.fit()
    assert res["history"][-1]["eval_split"] == "test" and res["best"]["epoch"] == 1


def test_class_subset_and_imbalance_from_config(tmp_path):
    t = Trainer(_cfg(tmp_path, method="standard", method_kwargs={}, epochs=1, classes=[3, 8], imbalance={8: 0.5}))
    assert t.data.num_classes == 2 and t.model.config["num_classes"] == 2
    n8 = int((t.data.y_train == 1).sum())
    assert abs(n8 - 0.5 * int((Trainer(_cfg(tmp_path / "full", method="standard", method_kwargs={})).data.y_train == 8).sum())) <= 1
    t.fit()


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    t = Trainer(_cfg(tmp_path, epochs=1, amp="bf16", channels_last=True, deterministic=False,
                     model="small-cnn", model_kwargs={"width": 4, "hidden": 16}, dataset="mnist5k"))
    t.data.x_train, t.data.y_train = t.data.x_train[:256], t.data.y_train[:256]
    row = t.fit()["history"][0]
    assert row["forward_per_image"] == pytest.approx(3) and 0 <= row["eval_robust"] <= row["eval_clean"]


def test_tensorboard_scalars_are_written(tmp_path):
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(_cfg(tmp_path, method="standard", method_kwargs={}, epochs=2, tensorboard=True)).fit()
    acc = EventAccumulator(str(tmp_path / "t" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train_accuracy", "eval_robust", "lr"} <= set(tags)
    assert [e.step for e in acc.Scalars("train_accuracy")] == [1, 2]


@pytest.mark.parametrize("spec,has_fgsm", [("pgd:norm=l1,eps=3.0,steps=2", False), ("deepfool:steps=3", False),
                                           ("pgd:norm=l2,eps=0.5,steps=2", True), ("fgsm:eps=0.1", True)])
def test_evaluation_panel_for_any_eval_attack(tmp_path, spec, has_fgsm):
    t = Trainer(_cfg(tmp_path, method="standard", method_kwargs={}, epochs=1, eval_attack=spec))
    row = t.fit()["history"][0]
    assert ("eval_fgsm" in row) == has_fgsm and 0 <= row["eval_robust"] <= row["eval_clean"]


def test_compile_with_a_double_backward_method_is_refused_before_training(tmp_path):
    """torch.compile cannot differentiate a gradient (margin's regulariser): refused by name, not a crash in the
    first backward (seen on an H200)."""
    with pytest.raises(ConfigError, match="'margin' differentiates .* set compile: false"):
        Trainer(TrainConfig(name="m", out_dir=str(tmp_path), method="margin", compile=True, epochs=1,
                            validation=0, select_best=False, progress=False))
    assert not (tmp_path / "m").exists()
