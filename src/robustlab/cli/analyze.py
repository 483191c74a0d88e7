"""`robustlab analyze ...` (the WPGD paper's analyses of adversarial training, each a PNG + JSON) and
`robustlab metric ...` (label metrics: WordNet from a local copy, the visual metric of a trained model)."""
from __future__ import annotations

from pathlib import Path

from robustlab.cli.common import load_labelled_models
from robustlab.errors import InputError
from robustlab.outputs import atomic_save_npy


def _data(args, extra):
    from robustlab.cli.common import load_eval_data

    x, y = load_eval_data(args.data, "test", extra or {})
    n = min(args.n_samples or x.shape[0], x.shape[0])
    return x[:n], y[:n]


def _metric(spec: str, num_classes: int, models=None, x=None, y=None):
    """'uniform' | 'cifar10-wordnet' | a .npy/.csv file | 'visual' (from the first model, targeted DeepFool) |
    'visual-linear' (exact, for a one-Linear-layer model)."""
    from robustlab.label_metrics.metric import get_metric
    from robustlab.label_metrics.visual import visual_metric

    if spec in ("visual", "visual-linear"):
        model = next(iter(models.values()))
        m, _ = visual_metric(model, x, y, num_classes, method="linear_exact" if spec == "visual-linear" else "deepfool",
                             n_per_class=200)
        return m
    return get_metric(spec, num_classes, normalize="max")


def _setup(args):
    from robustlab.utils import set_threads

    set_threads(getattr(args, "threads", None))
    models, extras = load_labelled_models(args.model, "cpu", "classification", all_extras=True)
    x, y = _data(args, next(iter(extras.values())))
    return models, x, y


def _num_classes(models) -> int:
    m = next(iter(models.values()))
    return int(m.config["num_classes"])


def cmd_gap(args) -> int:
    from robustlab.analysis.wpgd import accuracy_gap

    if len(args.model) != 2:
        raise InputError("analyze gap takes exactly two models: --model CE=... --model PGD=...")
    models, x, y = _setup(args)
    metric_models = models
    if args.metric_model:
        from robustlab.engine.checkpoint import load_model

        metric_models = {"metric": load_model(args.metric_model, map_location="cpu")[0].eval()}
    metric = _metric(args.metric, _num_classes(models), metric_models, x, y)
    (ce, rob) = models.values()
    r = accuracy_gap(ce, rob, x, y, metric, args.out)
    print(f"accuracy gap vs metric: Pearson {r['pearson']:.3f}, Spearman {r['spearman']:.3f}; wrote {args.out}")
    return 0


def cmd_entropy(args) -> int:
    from robustlab.analysis.wpgd import entropy_histograms

    models, x, y = _setup(args)
    r = entropy_histograms(models, x, y, args.out, class_index=None if args.class_index < 0 else args.class_index)
    print(" ".join(f"{k}: mean entropy {v['mean_entropy']:.3f}" for k, v in r["models"].items()) + f"; wrote {args.out}")
    return 0


def cmd_tsne(args) -> int:
    from robustlab.analysis.wpgd import tsne_features

    models, x, y = _setup(args)
    r = tsne_features(models, x, y, args.out, n_per_class=args.per_class, seed=args.seed)
    print(" ".join(f"{k}: silhouette {v['silhouette']:.3f}" for k, v in r["models"].items()) + f"; wrote {args.out}")
    return 0


def cmd_toy(args) -> int:
    from robustlab.analysis.wpgd import toy3
    from robustlab.utils import set_threads

    set_threads(args.threads)
    r = toy3(args.out, eps_list=args.eps, seeds=args.seed, epochs=args.epochs, p=args.p, lr=args.lr)
    for m in r["models"]:
        print(f"seed {m['seed']} {m['kind']:5s} eps {m['eps']:<5g} acc {m['accuracy']:.3f} "
              f"acc{{0,2}} {m['accuracy_02']:.3f}")
    for e, c in r.get("check", {}).items():
        d = c["wpgd_minus_pgd"]
        print(f"eps {e}: acc{{0,2}} WPGD - PGD over {len(args.seed)} seeds {d['mean']:+.3f} (95% interval "
              f"{d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}): {d['verdict']}; the mean is "
              f"{'higher' if c['wpgd_mean_higher'] else 'not higher'} for WPGD")
    print(f"wrote {args.out}")
    return 0


def cmd_two_class(args) -> int:
    from robustlab.analysis.wpgd import two_class
    from robustlab.attacks.spec import parse_spec
    from robustlab.registry import DATASETS
    from robustlab.utils import set_threads

    set_threads(args.threads)
    name, kwargs = parse_spec(args.data, DATASETS)
    pairs = []
    for p in args.pair:
        a, _, b = p.partition(",")
        if not b:
            raise InputError(f"--pair takes two class ids like 3,5, got {p!r}")
        pairs.append((int(a), int(b)))
    two_class(args.out, dataset=name, dataset_kwargs=kwargs, pairs=pairs, ratio=args.ratio, eps=args.eps,
              epochs=args.epochs, out_dir=str(Path(args.out).with_suffix("")) + "-runs")
    print(f"wrote {args.out}")
    return 0


def cmd_score(args) -> int:
    from robustlab.analysis.wpgd import weighted_score

    models, x, y = _setup(args)
    metric = _metric(args.metric, _num_classes(models), models, x, y)
    r = weighted_score(models, x, y, metric, args.out, eps=args.eps, steps=args.steps, attack_p=args.attack_p,
                       reference=args.reference)
    print("| model | adversarial error (%) | S | S - S_ref |\n|---|---|---|---|")
    for k, v in r["models"].items():
        print(f"| {k} | {100 * v['adversarial_error']:.2f} | {v['S']:.4f} | {v['S_minus_reference']:+.4f} |")
    print(f"wrote {args.out}")
    return 0


def cmd_directional(args) -> int:
    from robustlab.analysis.wpgd import directional

    models, x, y = _setup(args)
    directional(models, x, y, args.out, eps=args.eps, steps=args.steps)
    print(f"wrote {args.out}")
    return 0


def cmd_metric_wordnet(args) -> int:

    from robustlab.label_metrics.metric import wordnet_metric

    if not args.classes.exists():
        raise InputError(f"class list {args.classes} does not exist (one class per line)")
    classes = [c.strip() for c in args.classes.read_text().splitlines() if c.strip()]
    m = wordnet_metric(classes, root=args.wordnet_root, measure=args.measure,
                       normalize=None if args.no_normalize else "max")
    atomic_save_npy(args.out, m.numpy())
    print(f"wrote the {len(classes)} x {len(classes)} WordNet metric to {args.out}")
    return 0


def cmd_metric_visual(args) -> int:

    from robustlab.cli.common import load_eval_data
    from robustlab.engine.checkpoint import load_model
    from robustlab.label_metrics.visual import visual_metric
    from robustlab.models import model_config

    model, extra = load_model(args.model, map_location="cpu")

    x, y = load_eval_data(args.data, "test", extra)
    m, info = visual_metric(model.eval(), x, y, int(model_config(model)["num_classes"]), method=args.method,
                            n_per_class=args.per_class)
    atomic_save_npy(args.out, m.numpy())
    fails = sum(map(sum, info["failures"]))
    print(f"wrote the visual metric to {args.out} ({fails} targeted-DeepFool failures excluded)")
    return 0


def _common(p, models: str = "append", out_help: str = "PNG path (a JSON of the numbers is written beside it)"):
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                   help="a checkpoint, optionally labelled (repeatable)")
    p.add_argument("--data", help="dataset NAME[:key=value,...]; default: the first checkpoint's training data")
    p.add_argument("--n-samples", type=int, help="use the first N test images")
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--threads", type=int, help="torch CPU threads")


METRIC_HELP = ("label metric: uniform, cifar10-wordnet, a K x K .npy/.csv file, visual (targeted DeepFool on the "
               "first model) or visual-linear (exact, one-Linear-layer model)")


def add_commands(sub) -> None:
    pa = sub.add_parser("analyze", help="the WPGD paper's analyses (PNG + JSON each)",
                        description="Analyses of adversarial training (Terzi et al.): accuracy gap vs label metric, "
                                    "entropy histograms, t-SNE of features, the 3-class toy problem, two-class "
                                    "balanced/unbalanced training, the weighted robustness score S, directional "
                                    "robustness per class pair.")
    asub = pa.add_subparsers(dest="action", required=True)
    g = asub.add_parser("gap", help="accuracy gap |C_pgd - C_ce| beside the label metric, and their correlation",
                        description="Row-normalised clean confusion matrices of a CE and a robust model, their "
                                    "absolute difference G, the label metric, and the Pearson/Spearman correlation "
                                    "over the off-diagonal pairs (the seed's Table 1).")
    _common(g)
    g.add_argument("--metric", default="visual", help=METRIC_HELP)
    g.add_argument("--metric-model", help="checkpoint the visual metric is computed from (default: the CE model)")
    g.set_defaults(func=cmd_gap)
    e = asub.add_parser("entropy", help="histograms of softmax entropy, one per model",
                        description="Entropy (nats) of the softmax outputs on the test images of one class.")
    _common(e)
    e.add_argument("--class-index", type=int, default=0, help="class to use (-1: all test images)")
    e.set_defaults(func=cmd_entropy)
    t = asub.add_parser("tsne", help="t-SNE of penultimate features, one panel per model",
                        description="t-SNE (scikit-learn, PCA init, seeded) of the input of each model's last Linear "
                                    "layer, coloured by class, with the silhouette score of the features.")
    _common(t)
    t.add_argument("--per-class", type=int, default=100, help="test images per class")
    t.add_argument("--seed", type=int, default=0, help="seed of the sample draw and of t-SNE")
    t.set_defaults(func=cmd_tsne)
    y = asub.add_parser("toy", help="the 3-class 2-D problem: CE, PGD and WPGD boundaries at several eps",
                        description="Cost [[0,10,0.01],[10,0,1],[0.01,1,0]]; MLP 2-64-64-3 trained full batch with CE, "
                                    "PGD (l2, CE inner loss) and WPGD (Wasserstein inner loss); deterministic per seed.")
    y.add_argument("--out", type=Path, required=True, help="PNG path (JSON beside it)")
    y.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="l_2 budgets, one panel each")
    y.add_argument("--epochs", type=int, default=2000, help="full-batch training steps")
    y.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    y.add_argument("--p", type=float, default=1.0, help="metric exponent")
    y.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="seeds of the data, the initialisation and the attacks, one row of panels each; with several, "
                        "WPGD - PGD on classes {0, 2} paired by seed with its 95%% t interval (wpgd.md 5.5)")
    y.add_argument("--threads", type=int, help="torch CPU threads")
    y.set_defaults(func=cmd_toy)
    w = asub.add_parser("two-class", help="balanced and unbalanced two-class training curves, CE vs PGD",
                        description="For each --pair a,b: CE and PGD-AT on the two classes, balanced and with only "
                                    "--ratio of b's training images; validation error per epoch.")
    w.add_argument("--data", default="mnist5k", help="dataset NAME[:key=value,...]")
    w.add_argument("--pair", action="append", required=True, help="two class ids, e.g. 4,9 (repeatable)")
    w.add_argument("--ratio", type=float, default=0.3, help="share of the second class kept (unbalanced run)")
    w.add_argument("--eps", type=float, default=0.3, help="l_inf budget of PGD-AT")
    w.add_argument("--epochs", type=int, default=5, help="training epochs")
    w.add_argument("--out", type=Path, required=True, help="PNG path (JSON beside it)")
    w.add_argument("--threads", type=int, help="torch CPU threads")
    w.set_defaults(func=cmd_two_class)
    s = asub.add_parser("score", help="adversarial confusion matrices and the weighted robustness score S",
                        description="l_inf PGD maximising the Wasserstein loss under the metric (the attacker knows "
                                    "it); M = row-normalised adversarial confusion; S = sum C_ij M_ij per model and "
                                    "relative to the reference (the seed's Table 3).")
    _common(s)
    s.add_argument("--metric", required=True, help=METRIC_HELP)
    s.add_argument("--eps", type=float, required=True, help="l_inf budget of the attack")
    s.add_argument("--steps", type=int, default=20, help="PGD steps")
    s.add_argument("--attack-p", type=float, default=1.0, help="the attacker's metric exponent")
    s.add_argument("--reference", help="label of the reference model (default: the first)")
    s.set_defaults(func=cmd_score)
    d = asub.add_parser("directional", help="per-pair robustness of two models and its difference",
                        description="1 - M_ij under CE PGD for two models (e.g. PGD and WPGD) and their difference "
                                    "(the seed's Fig. 11).")
    _common(d)
    d.add_argument("--eps", type=float, required=True, help="l_inf budget of the attack")
    d.add_argument("--steps", type=int, default=20, help="PGD steps")
    d.set_defaults(func=cmd_directional)

    pm = sub.add_parser("metric", help="build label metrics (WordNet, visual) as .npy files",
                        description="Label metrics for WPGD: `wordnet` from a class list and a local WordNet (NLTK + "
                                    "Debian wordnet-base), `visual` from a trained standard model.")
    msub = pm.add_subparsers(dest="action", required=True)
    mw = msub.add_parser("wordnet", help="pairwise WordNet distances of a class list",
                         description="One class per line: a synset name (dog.n.01), a wnid (n02084071) or a word. "
                                     "Needs nltk and Debian's wordnet-base files (copied under --wordnet-root).")
    mw.add_argument("--classes", type=Path, required=True,
                    help="text file, one class per line (synset name, wnid or word), in label order")
    mw.add_argument("--out", type=Path, required=True, help=".npy path")
    mw.add_argument("--wordnet-root", type=Path, default=Path.home() / ".cache" / "robustlab" / "nltk_data",
                    help="folder holding NLTK's wordnet corpus")
    mw.add_argument("--measure", default="shortest_path", choices=("shortest_path", "path", "wup"),
                    help="WordNet distance: shortest-path length, 1 - path similarity, or 1 - Wu-Palmer")
    mw.add_argument("--no-normalize", action="store_true", help="keep raw distances (default: divide by the max)")
    mw.set_defaults(func=cmd_metric_wordnet)
    mv = msub.add_parser("visual", help="the visual metric of a trained standard model",
                         description="Mean minimal targeted-DeepFool l2 distance between class pairs over correctly "
                                     "classified test images, symmetrised and normalised (exact for linear models).")
    mv.add_argument("--model", required=True, help="checkpoint of a standard (CE) model")
    mv.add_argument("--data", help="dataset NAME[:key=value,...]; default: the checkpoint's training data")
    mv.add_argument("--method", default="deepfool", choices=("deepfool", "linear_exact", "linearized"),
                    help="how the minimal targeted distance is found")
    mv.add_argument("--per-class", type=int, default=200, help="test images per class")
    mv.add_argument("--out", type=Path, required=True, help=".npy path")
    mv.set_defaults(func=cmd_metric_visual)
