"""`robustlab compare` (classifiers side by side under one panel), `robustlab export-adversarials` and
`robustlab score-labels` (the adversary-critic paper's human-study material), `robustlab part-figure`,
`robustlab boundary-figure` (MNG-AC's decision-boundary slices)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustlab.cli.common import command_line, load_labelled_models
from robustlab.errors import InputError
from robustlab.outputs import atomic_write_text


def cmd_compare(args: argparse.Namespace) -> int:
    from robustlab.attacks.spec import expand_panels
    from robustlab.cli.common import load_eval_data
    from robustlab.reports.compare import compare_models, compare_table, integrity_notes, write_compare
    from robustlab.utils import machine_description, set_threads

    set_threads(args.threads)
    models, extras = load_labelled_models(args.model, args.device, "classification", all_extras=True)
    x, y = load_eval_data(args.data, "test", next(iter(extras.values())) or {})
    n = min(args.n_samples or x.shape[0], x.shape[0])
    x, y = x[:n].to(args.device), y[:n].to(args.device)
    specs = expand_panels(args.attack)
    results = compare_models(models, x, y, specs, batch_size=args.batch_size, progress=None if not args.quiet else False)
    for label, extra in extras.items():  # the training time recorded in the checkpoint, when there is one
        if (extra or {}).get("train_seconds") is not None:
            results[label]["train_seconds"] = extra["train_seconds"]
    print(compare_table(results))
    for note in integrity_notes(results):
        print(f"integrity warning {note[2:]}")
    if args.out:
        path = write_compare(args.out, results, specs=specs, n_samples=n, command=command_line(), machine=machine_description())
        print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from robustlab.cli.common import load_eval_data
    from robustlab.engine.checkpoint import load_model
    from robustlab.reports.human_study import export_adversarials
    from robustlab.utils import set_threads

    set_threads(args.threads)
    model, extra = load_model(args.model, map_location=args.device)
    x, y = load_eval_data(args.data, "test", extra)
    summary = export_adversarials(model.eval(), x[: args.n_samples].to(args.device), y[: args.n_samples].to(args.device),
                                  args.out, seed=args.seed, deepfool_steps=args.steps, critic_steps=args.steps)
    atomic_write_text(Path(args.out) / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/labels_to_fill.csv (for annotators) and {args.out}/targets.csv (the key)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from robustlab.reports.human_study import score_labels

    for path in (args.targets, args.labels):
        if not Path(path).exists():
            raise InputError(f"{path} does not exist")
    scores = score_labels(args.targets, args.labels)
    print("| adversarial kind | labelled | change (%) | no change (%) |\n|---|---|---|---|")
    for kind, s in scores.items():
        print(f"| {kind} | {s['n']} | {100 * s['change']:.2f} | {100 * s['no_change']:.2f} |")
    return 0


def cmd_part_figure(args: argparse.Namespace) -> int:
    from robustlab import evaluate
    from robustlab.attacks.pixel_ag import PixelAG
    from robustlab.cli.common import load_eval_data
    from robustlab.engine.checkpoint import load_model
    from robustlab.reports.part_figure import part_figure, part_maps

    part, extra = load_model(args.part, map_location="cpu")
    at, _ = load_model(args.at, map_location="cpu")
    x, y = load_eval_data(args.data, "test", extra)
    x, y = x[: args.n_samples], y[: args.n_samples]
    maps = part_maps(part, x, eps=args.eps, eps_low=args.eps_low, layer=args.cam_layer, cam_method=args.cam_method)
    # the attacks run in the evaluator (threat checks); images a model misclassifies keep x: no perturbation shown
    pgd = f"pgd:norm=linf,eps={args.eps},steps=20,step_size={args.step_size},best_iterate=false"
    at_adv = evaluate(at, x, y, [pgd], checks=False, progress=False, keep_adversarials=True)["adversarials"]["pgd"]
    pixel_ag = PixelAG(part, budget=maps["budget"], steps=20, step_size=args.step_size)
    part_adv = evaluate(part, x, y, [pixel_ag], checks=False, progress=False,
                        keep_adversarials=True)["adversarials"]["pixel-ag"]
    path = part_figure(x, maps, at_adv, part_adv, args.out, eps=args.eps, eps_low=args.eps_low,
                       cam_method=args.cam_method)
    print(f"wrote {path}")
    return 0


def cmd_boundary_figure(args: argparse.Namespace) -> int:
    from robustlab import evaluate
    from robustlab.cli.common import load_eval_data
    from robustlab.reports.boundary_figure import boundary_figure
    from robustlab.utils import set_threads

    set_threads(args.threads)
    models, extra = load_labelled_models(args.model, "cpu", "classification")
    x, y = load_eval_data(args.data, "test", extra or {})
    x, y = x[: args.n_samples], y[: args.n_samples]
    # each model's own adversarial direction, from the evaluator (threat checks; x itself where misclassified)
    adversarials = {name: next(iter(evaluate(m, x, y, [args.attack], checks=False, progress=False,
                                             keep_adversarials=True)["adversarials"].values()))
                    for name, m in models.items()}
    path = boundary_figure(models, x, y, adversarials, args.out, attack=args.attack, span=args.span, grid=args.grid,
                           seed=args.seed)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def add_commands(sub) -> None:
    pc = sub.add_parser("compare", help="several classifiers under one attack panel, as one table",
                        description="Evaluate classifiers on the same test images and attacks and print one table: "
                                    "error (%), robust accuracy (%) for bounded attacks, rho = mean ||r||/||x|| for "
                                    "minimal ones (DeepFool, C&W, critic). --out writes compare.md/.html/.json.")
    pc.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                    help="a checkpoint, optionally labelled (repeatable)")
    pc.add_argument("--attack", action="append", required=True, metavar="SPEC",
                    help="attack spec or panel name (repeatable), e.g. critic-rho")
    pc.add_argument("--data", help="dataset NAME[:key=value,...]; default: the first checkpoint's training data")
    pc.add_argument("--n-samples", type=int, help="evaluate the first N test images")
    pc.add_argument("--batch-size", type=int, default=500, help="images per evaluation batch")
    pc.add_argument("--out", type=Path, help="write compare.md, compare.html and compare.json here")
    pc.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    pc.add_argument("--threads", type=int, help="torch CPU threads")
    pc.add_argument("--quiet", action="store_true", help="no progress bar")
    pc.set_defaults(func=cmd_compare)

    px = sub.add_parser("export-adversarials", help="boundary and high-confidence adversarial examples for a human study",
                        description="Adversarial examples at the decision boundary (DeepFool) and at high confidence "
                                    "(critic attack, target confidence = confidence on the original) as PNG grids, "
                                    "one PNG per image under shuffled ids, labels_to_fill.csv and targets.csv.")
    px.add_argument("--model", required=True, help="classifier checkpoint (.safetensors)")
    px.add_argument("--out", type=Path, required=True, help="output folder")
    px.add_argument("--data", help="dataset NAME[:key=value,...]; default: the checkpoint's training data")
    px.add_argument("--n-samples", type=int, default=100, help="test images to attack (correctly classified ones)")
    px.add_argument("--steps", type=int, default=500, help="iterations of both attacks")
    px.add_argument("--seed", type=int, default=0, help="seed of the shuffled ids")
    px.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    px.add_argument("--threads", type=int, help="torch CPU threads")
    px.set_defaults(func=cmd_export)

    pf = sub.add_parser("part-figure", help="CAM, mask, budget map and AT vs PART perturbations for a few images",
                        description="The PART seed's illustration as a PNG: one row per test image with the PART "
                                    "model's CAM, the importance mask, the budget map, the PGD perturbation against "
                                    "the AT model and the Pixel-AG perturbation against the PART model.")
    pf.add_argument("--part", required=True, help="PART (or PART-T/-M) checkpoint")
    pf.add_argument("--at", required=True, help="the AT baseline checkpoint")
    pf.add_argument("--out", type=Path, required=True, help="PNG path")
    pf.add_argument("--data", help="dataset NAME[:key=value,...]; default: the PART checkpoint's training data")
    pf.add_argument("--n-samples", type=int, default=6, help="test images shown (one row each)")
    pf.add_argument("--eps", type=float, default=8 / 255, help="l_inf budget on the CAM-important pixels")
    pf.add_argument("--eps-low", type=float, default=7 / 255, help="l_inf budget on the other pixels")
    pf.add_argument("--step-size", type=float, default=2 / 255, help="PGD / Pixel-AG step size")
    pf.add_argument("--cam-layer", help="module name (default: per architecture)")
    pf.add_argument("--cam-method", default="gradcam", choices=("gradcam", "xgradcam", "layercam"),
                    help="class activation map that makes the importance mask")
    pf.set_defaults(func=cmd_part_figure)

    pb = sub.add_parser("boundary-figure", help="predictions on a 2-D input slice: adversarial x random direction",
                        description="MNG-AC's decision-boundary figure as a PNG (+ JSON of the grids): for each test "
                                    "image and model, the predicted class over x + a u + b v, u the model's own "
                                    "adversarial direction (unit l2), v a seeded random direction orthogonal to u.")
    pb.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                    help="a checkpoint, optionally labelled (repeatable), e.g. adv-inf=runs/adv-inf/best.safetensors")
    pb.add_argument("--out", type=Path, required=True, help="PNG path")
    pb.add_argument("--data", help="dataset NAME[:key=value,...]; default: the first checkpoint's training data")
    pb.add_argument("--attack", default="pgd:norm=linf,eps=0.3,steps=20,step_size=0.0375",
                    help="attack spec giving the adversarial direction")
    pb.add_argument("--span", type=float, default=4.0, help="half-width of the slice in l2 units")
    pb.add_argument("--grid", type=int, default=41, help="grid points per axis")
    pb.add_argument("--n-samples", type=int, default=4, help="test images shown (one row each)")
    pb.add_argument("--seed", type=int, default=0, help="seed of the random direction")
    pb.add_argument("--threads", type=int, help="torch CPU threads")
    pb.set_defaults(func=cmd_boundary_figure)

    ps = sub.add_parser("score-labels", help="score a filled labels_to_fill.csv against targets.csv",
                        description="Share of annotations equal to the adversarial target (change) and to the "
                                    "original class (no change), per kind of adversarial example.")
    ps.add_argument("--targets", required=True, type=Path, help="targets.csv written by export-adversarials")
    ps.add_argument("--labels", required=True, type=Path, help="the filled labels_to_fill.csv")
    ps.set_defaults(func=cmd_score)
