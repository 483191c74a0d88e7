"""Label metrics: K x K costs C[i, j] of mistaking class i for class j (spec wpgd.md section 1), the ground cost
of WPGD's Wasserstein loss and of the weighted robustness score.

Sources: the CIFAR-10 WordNet matrix shipped as a constant (no WordNet needed at run time); `wordnet_metric`
for any class list, read from a local WordNet through NLTK (Debian `wordnet-base`, see `wordnet_help`);
`visual.py` from a trained standard model (mean minimal targeted-DeepFool distance between class pairs,
exact for linear models); a user file (.npy / .csv). Every metric is validated: square, finite, non-negative,
zero diagonal, symmetric. `metric_power` applies the element-wise exponent p.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from robustlab.errors import MetricError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_SYNSETS = ("airplane.n.01", "car.n.01", "bird.n.01", "cat.n.01", "deer.n.01", "dog.n.01", "frog.n.01",
                   "horse.n.01", "ship.n.01", "truck.n.01")
# WordNet 3.0 shortest hypernym/hyponym path lengths between CIFAR10_SYNSETS (wpgd.md 1.3, checked offline with
# Debian's wordnet-base and NLTK)
CIFAR10_WORDNET_DISTANCES = (
    (0, 8, 14, 18, 19, 13, 15, 19, 5, 8),
    (8, 0, 13, 17, 18, 12, 14, 18, 7, 2),
    (14, 13, 0, 6, 7, 5, 3, 7, 13, 13),
    (18, 17, 6, 0, 7, 4, 7, 7, 17, 17),
    (19, 18, 7, 7, 0, 7, 8, 6, 18, 18),
    (13, 12, 5, 4, 7, 0, 6, 7, 12, 12),
    (15, 14, 3, 7, 8, 6, 0, 8, 14, 14),
    (19, 18, 7, 7, 6, 7, 8, 0, 18, 18),
    (5, 7, 13, 17, 18, 12, 14, 18, 0, 7),
    (8, 2, 13, 17, 18, 12, 14, 18, 7, 0),
)


def check_metric(c, num_classes: int | None = None, name: str = "label metric") -> Tensor:
    """The metric as a float64 tensor after validation; raises MetricError naming the problem."""
    t = torch.as_tensor(np.asarray(c, dtype=np.float64))
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise MetricError(f"{name} must be a square K x K matrix, got shape {tuple(t.shape)}")
    if num_classes is not None and t.shape[0] != num_classes:
        raise MetricError(f"{name} is {t.shape[0]} x {t.shape[0]} but the model has {num_classes} classes")
    if not torch.isfinite(t).all():
        raise MetricError(f"{name} has NaN or infinite entries")
    if (t < 0).any():
        i, j = (t < 0).nonzero()[0].tolist()
        raise MetricError(f"{name} must be non-negative; entry ({i}, {j}) is {t[i, j].item():g}")
    if (t.diagonal() != 0).any():
        i = int((t.diagonal() != 0).nonzero()[0])
        raise MetricError(f"{name} must have a zero diagonal; entry ({i}, {i}) is {t[i, i].item():g}")
    if not torch.allclose(t, t.T, rtol=1e-6, atol=1e-9):
        i, j = ((t - t.T).abs() > 1e-9).nonzero()[0].tolist()
        raise MetricError(f"{name} must be symmetric; C[{i},{j}] = {t[i, j].item():g} but C[{j},{i}] = {t[j, i].item():g}")
    return t


def normalize_metric(c: Tensor, normalize: str | None = "max") -> Tensor:
    """normalize="max": divide by the largest off-diagonal entry (costs in [0, 1]); None: unchanged."""
    if normalize is None or normalize == "none":
        return c
    if normalize != "max":
        raise MetricError(f"unknown normalisation {normalize!r}; valid: max, none")
    top = c.max()
    if top <= 0:
        raise MetricError("the label metric is zero everywhere; it cannot be normalised")
    return c / top


def metric_power(c: Tensor, p: float) -> Tensor:
    """Element-wise C ** p (p > 0: p = 0 would put 1 on the diagonal and make the loss constant)."""
    if not p > 0:
        raise MetricError(f"the metric exponent p must be > 0, got {p}; PGD-AT (cross-entropy) is the p = 0 reference")
    return c ** p


def uniform_metric(num_classes: int) -> Tensor:
    """1 off the diagonal: the Wasserstein loss becomes 1 - p_true (WPGD then behaves like PGD)."""
    return 1.0 - torch.eye(num_classes, dtype=torch.float64)


def cifar10_wordnet(normalize: str | None = "max") -> Tensor:
    return normalize_metric(check_metric(CIFAR10_WORDNET_DISTANCES, name="CIFAR-10 WordNet metric"), normalize)


def load_metric_file(path: str | Path, num_classes: int | None = None) -> Tensor:
    """A K x K metric from .npy (no pickles) or .csv (comma- or whitespace-separated numbers)."""
    path = Path(path)
    if not path.exists():
        raise MetricError(f"label metric file {path} does not exist")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            text = path.read_text().replace(",", " ")
            arr = np.array([[float(v) for v in line.split()] for line in text.splitlines() if line.strip()])
    except (ValueError, OSError) as e:
        raise MetricError(f"cannot read the label metric {path}: {e}") from None
    return check_metric(arr, num_classes, name=f"label metric {path.name}")


def get_metric(spec: str | Sequence | Tensor, num_classes: int, normalize: str | None = None) -> Tensor:
    """Resolve a metric: "uniform", "cifar10-wordnet", a .npy/.csv path, or a matrix; validated for K classes."""
    c: Sequence | Tensor
    if isinstance(spec, str):
        if spec == "uniform":
            c = uniform_metric(num_classes)
        elif spec == "cifar10-wordnet":
            c = cifar10_wordnet()
        elif Path(spec).suffix in (".npy", ".csv", ".txt"):
            c = load_metric_file(spec, num_classes)
        else:
            raise MetricError(f"unknown label metric {spec!r}; valid: uniform, cifar10-wordnet, or a .npy/.csv file")
    else:
        c = spec
    return normalize_metric(check_metric(c, num_classes), normalize)


# -- WordNet (optional: needs nltk and a local WordNet 3.0) -------------------------------------------------------

WORDNET_HELP = (
    "WordNet is read offline through NLTK from Debian's files: `apt-get install wordnet-base wordnet-sense-index`, "
    "`pip install nltk`, then pass --wordnet-root DIR (robustlab copies /usr/share/wordnet into "
    "DIR/corpora/wordnet and writes the lexnames file NLTK needs). The CIFAR-10 matrix ships with robustlab and "
    "needs none of this.")

_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
             "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
             "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
             "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
             "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
             "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
             "adj.ppl").split()


def _lexnames_text() -> str:
    cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    return "".join(f"{i:02d}\t{n}\t{cat[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES))


def open_wordnet(root: str | Path, source: str | Path = "/usr/share/wordnet"):
    """NLTK's WordNet reader over a local copy of Debian's WordNet 3.0 files (wpgd.md 1.3); MetricError if absent."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise MetricError("the WordNet metric needs nltk (pip install nltk). " + WORDNET_HELP) from None
    root, source = Path(root), Path(source)
    target = root / "corpora" / "wordnet"
    if not (target / "data.noun").exists():
        if not (source / "data.noun").exists():
            raise MetricError(f"no WordNet files in {source} or {target}. " + WORDNET_HELP)
        import shutil

        target.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file():
                shutil.copy(f, target / f.name)
    if not (target / "lexnames").exists():
        (target / "lexnames").write_text(_lexnames_text())
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return WordNetCorpusReader(str(target), None)


def resolve_synsets(wn, classes: Sequence[str]) -> list:
    """Each class as a synset: a synset name (dog.n.01), a WordNet noun offset id (n02084071, Tiny-ImageNet's wnids)
    or a plain word (its first noun sense). Unknown classes raise MetricError naming them."""
    out, unknown = [], []
    for c in classes:
        c = c.strip()
        try:
            if len(c) == 9 and c[0] == "n" and c[1:].isdigit():
                s = wn.synset_from_pos_and_offset("n", int(c[1:]))
            elif c.count(".") == 2:
                s = wn.synset(c)
            else:
                senses = wn.synsets(c.replace(" ", "_"), pos="n")
                s = senses[0] if senses else None
        except Exception:  # nltk raises WordNetError / ValueError for unknown names
            s = None
        if s is None:
            unknown.append(c)
        out.append(s)
    if unknown:
        raise MetricError(f"class name(s) not found in WordNet: {', '.join(map(repr, unknown))}; give a synset "
                          "name such as dog.n.01 or a wnid such as n02084071")
    return out


def wordnet_metric(classes: Sequence[str], *, root: str | Path, measure: str = "shortest_path",
                   normalize: str | None = "max", wordnet=None) -> Tensor:
    """Pairwise WordNet distances between the classes' synsets: shortest hypernym/hyponym path length (default),
    1 - path_similarity, or 1 - wup_similarity. `wordnet`: an already opened reader (tests pass a stand-in)."""
    measures: dict[str, Callable] = {
        "shortest_path": lambda a, b: a.shortest_path_distance(b),
        "path": lambda a, b: 1.0 - a.path_similarity(b),
        "wup": lambda a, b: 1.0 - a.wup_similarity(b),
    }
    if measure not in measures:
        raise MetricError(f"unknown WordNet measure {measure!r}; valid: {', '.join(measures)}")
    wn = wordnet if wordnet is not None else open_wordnet(root)
    syn = resolve_synsets(wn, classes)
    k = len(syn)
    d = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            v = measures[measure](syn[i], syn[j])
            if v is None:
                raise MetricError(f"WordNet has no path between {classes[i]!r} and {classes[j]!r}")
            d[i, j] = d[j, i] = float(v)
    return normalize_metric(check_metric(d, name="WordNet metric"), normalize)


__all__ = ["CIFAR10_CLASSES", "CIFAR10_SYNSETS", "CIFAR10_WORDNET_DISTANCES", "MetricError", "check_metric",
           "normalize_metric", "metric_power", "uniform_metric", "cifar10_wordnet", "load_metric_file", "get_metric",
           "open_wordnet", "resolve_synsets", "wordnet_metric", "WORDNET_HELP"]
