"""Bad input gives a clear error naming the problem."""
import pytest
import torch

from robustlab import evaluate
from robustlab.attacks import PGD, create_attack, parse_attack_spec
from robustlab.models import create_model
from tests.conftest import TinyCNN


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_nan_images(model):
    x = torch.rand(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PGD(model, eps=0.1)(x, torch.tensor([0, 1]))


def test_inf_images(model):
    x = torch.rand(2, 1, 8, 8)
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        PGD(model, eps=0.1)(x, torch.tensor([0, 1]))


def test_out_of_range_images(model):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD(model, eps=0.1)(torch.rand(2, 1, 8, 8) * 255, torch.tensor([0, 1]))


def test_wrong_rank(model):
    with pytest.raises(ValueError, match="rank 3"):
        PGD(model, eps=0.1)(torch.rand(1, 8, 8), torch.tensor([0]))


def test_integer_images(model):
    with pytest.raises(TypeError, match="floating-point"):
        PGD(model, eps=0.1)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))


def test_labels_out_of_range(model):
    with pytest.raises(ValueError, match="label 10 but the model outputs 10 classes"):
        PGD(model, eps=0.1)(torch.rand(2, 1, 8, 8), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="negative"):
        PGD(model, eps=0.1)(torch.rand(2, 1, 8, 8), torch.tensor([0, -1]))


def test_labels_wrong_length(model):
    with pytest.raises(ValueError, match="3 labels but the batch has 2"):
        PGD(model, eps=0.1)(torch.rand(2, 1, 8, 8), torch.tensor([0, 1, 2]))


def test_labels_float(model):
    with pytest.raises(TypeError, match="integer"):
        PGD(model, eps=0.1)(torch.rand(2, 1, 8, 8), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd-ce", "square", "mma", "autoattack"])
def test_negative_eps(model, name):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        create_attack(name, model, eps=-0.1)


@pytest.mark.parametrize("spec", ["pgd:steps=0", "apgd-ce:steps=0", "cw:steps=0", "deepfool:steps=0", "fab:steps=0",
                                  "mma:steps=0", "square:n_queries=0"])
def test_steps_below_one(model, spec):
    with pytest.raises(ValueError, match=">= 1"):
        create_attack(spec, model)


def test_unknown_attack_lists_valid_names(model):
    with pytest.raises(KeyError, match="valid names: .*pgd"):
        create_attack("pgdd", model)


def test_unknown_attack_option(model):
    with pytest.raises(TypeError, match="bad options for attack 'pgd'"):
        create_attack("pgd:stepz=3", model)


def test_spec_parsing():
    assert parse_attack_spec("pgd:norm=linf,eps=8/255,steps=40,random_start=false") == (
        "pgd", {"norm": "linf", "eps": 8 / 255, "steps": 40, "random_start": False})
    with pytest.raises(ValueError, match="key=value"):
        parse_attack_spec("pgd:eps")


def test_unknown_norm_and_loss(model):
    with pytest.raises(ValueError, match="unknown norm"):
        PGD(model, norm="l7")
    with pytest.raises(ValueError, match="unknown attack loss"):
        PGD(model, loss="hinge")
    with pytest.raises(ValueError, match="supports norms"):
        create_attack("apgd-ce", model, norm="l1")


def test_targeted_with_true_label(model):
    with pytest.raises(ValueError, match="target equals the true label"):
        PGD(model, eps=0.1).run(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), target=torch.tensor([0, 2]))


def test_evaluate_needs_labels(model):
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, torch.rand(2, 1, 8, 8), None)


def test_unknown_model_and_bad_options():
    with pytest.raises(KeyError, match="valid names"):
        create_model("resnet1000")
    with pytest.raises(TypeError, match="bad options for model"):
        create_model("mlp", widht=3)
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wrn", depth=27)


@pytest.mark.parametrize("spec", ["pgd:eps=8", "fgsm:eps=16", "apgd-ce:eps=4", "autoattack:norm=linf,eps=8",
                                  "square:eps=2", "mma:eps=8"])
def test_linf_budget_in_pixel_units_names_the_likely_mistake(model, spec):
    """Classifiers take [0, 1] inputs: an l_inf eps above 1 is the detector's pixel unit leaking in."""
    from robustlab.errors import InputError

    with pytest.raises(InputError, match=r"/255"):
        create_attack(spec, model)
    create_attack("pgd:norm=l2,eps=8", model)  # l_2 / l_1 budgets above 1 are ordinary


def test_a_spec_key_given_twice_is_an_error(model):
    from robustlab.attacks.spec import expand_panels
    from robustlab.errors import AttackSpecError

    with pytest.raises(AttackSpecError, match="'eps' is given twice"):
        create_attack("pgd:eps=0.3,eps=0.01", model)
    with pytest.raises(AttackSpecError, match="given twice"):
        expand_panels(["part:eps=0.3,eps=0.1"])
    with pytest.raises(AttackSpecError, match="given twice"):
        from robustlab.attacks.spec import parse_spec
        from robustlab.registry import DATASETS

        parse_spec("mnist-det:n_train=5,n_train=6", DATASETS)


@pytest.mark.parametrize("n", [-5, 0])
def test_n_samples_must_be_positive(model, n):
    from robustlab.errors import InputError

    with pytest.raises(InputError, match="n_samples"):
        evaluate(model, torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)), ["fgsm:eps=0.1"], n_samples=n)


def test_attacks_given_as_a_string_is_an_error(model):
    from robustlab.errors import InputTypeError

    with pytest.raises(InputTypeError, match=r"attacks=\['fgsm"):
        evaluate(model, torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)), "fgsm:eps=0.1")


def test_the_one_key_value_parser():
    """Attack specs, config overrides, --robustbench-info and LABEL=PATH share validation.parse_assignment."""
    from robustlab.errors import AttackSpecError, ConfigError, InputError
    from robustlab.validation import parse_assignment

    assert parse_assignment("eps=8/255", "x") == ("eps", 8 / 255)
    assert parse_assignment(" steps = 40", "x") == ("steps", 40)
    assert parse_assignment("norm=linf", "x") == ("norm", "linf")
    assert parse_assignment("a=true", "x") == ("a", True) and parse_assignment("a=None", "x") == ("a", None)
    assert parse_assignment("venue=ICML 2020", "x", literal=False) == ("venue", "ICML 2020")
    for bad, cls in (("eps", InputError), ("=3", ConfigError), ("eps=", AttackSpecError)):
        with pytest.raises(cls, match="in where"):
            parse_assignment(bad, "where", cls)
    with pytest.raises(AttackSpecError, match="division by zero"):
        parse_assignment("eps=8/0", "x")
