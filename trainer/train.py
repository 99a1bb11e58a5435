"""Train a classifier with one of the losses and evaluate every metric.

``train(config)`` is the whole run (data, scores, model, loop, evaluation, report) so the
command line, the end-to-end test and the paper benchmark share one code path.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from trainer import metrics as M
from trainer.data import (
    IndexedDataset,
    ScoredDataset,
    ScoreTable,
    image_folder_sample_ids,
    read_table,
)
from trainer.losses import DEFAULT_ALPHA, build_loss
from trainer.models import build_model
from trainer.weights import DEFAULT_MAPPING

# Fashion-MNIST training-set statistics (normalising with them is standard and leaks nothing).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
SUBSET_SEED = 20231  # the training subset is fixed across runs so seeds vary only the training


@dataclass
class TrainConfig:
    data: str = "fmnist"  # "fmnist" or an ImageFolder directory
    test_data: str | None = None  # ImageFolder for testing; default: a held-out split
    test_fraction: float = 0.2
    fmnist_dir: str | None = None
    train_subset: int | None = None
    val_size: int = 0  # held out of the training split, for choosing hyper-parameters
    test_subset: int | None = None
    image_size: int = 32
    grayscale: bool = False
    model: str = "small-cnn"
    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = False
    loss: str = "ce"
    smoothing: float = 0.1
    gamma: float = 3.0
    beta: float = 0.1
    alpha: float = DEFAULT_ALPHA
    mapping: str = DEFAULT_MAPPING  # trainer.weights: quantile, rank, robust-sigmoid, exp-max
    temperature: float | str = "auto"  # the mapping's T; "auto" = its documented default
    quantile_low: float | None = None  # the quantile mapping's caps (None = its defaults)
    quantile_high: float | None = None
    score_column: str = "rmd"
    clip_quantile: float | None = None  # opt-in: cap scores at this quantile before weighting
    service_url: str | None = None
    dataset_id: str | None = None
    api_key: str | None = None
    scores_file: str | None = None
    cache_dir: str | None = None
    missing: str = "error"
    seed: int = 0
    device: str = "auto"
    ood: str = "noise"  # "noise", "none", or an ImageFolder directory
    output_dir: str | None = None
    progress: bool = True
    workers: int = 0
    threads: int | None = None


@dataclass
class Split:
    """A training or test set: a dataset yielding ``(x, y, index)`` or whole tensors."""

    dataset: Dataset
    num_classes: int
    in_channels: int
    tensors: tuple[Tensor, Tensor] | None = None  # in-memory fast path (x, y)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


# -- data -----------------------------------------------------------------------------------


def fmnist_train_indices(
    n_total: int, train_subset: int | None, val_size: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows of the Fashion-MNIST training split: fixed random subsets
    (the IDX files are not shuffled by class, so never "the first N"), disjoint, sorted.
    Benchmarks that compute scores for a subset call this to pick the same rows."""
    if val_size < 0 or val_size >= n_total:
        raise ValueError(f"val_size must be in [0, {n_total}), got {val_size}")
    order = np.random.default_rng(SUBSET_SEED).permutation(n_total)
    val, rest = order[:val_size], order[val_size:]
    if train_subset is not None:
        if train_subset <= 0:
            raise ValueError("train_subset must be positive")
        rest = rest[:train_subset]
    return np.sort(rest), np.sort(val)


def _fmnist_tensors(
    images: np.ndarray, labels: np.ndarray, index: np.ndarray
) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(images[index]).float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)
    return x.unsqueeze(1), torch.from_numpy(labels[index])


def _image_folder(root: str, cfg: TrainConfig) -> Any:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    steps: list[Any] = (
        [T.Grayscale(1)] if cfg.grayscale else [T.Lambda(lambda im: im.convert("RGB"))]
    )
    steps += [T.Resize((cfg.image_size, cfg.image_size)), T.ToTensor(), T.Normalize(0.5, 0.5)]
    return ImageFolder(root, transform=T.Compose(steps))


def _label_strings(
    table_labels: list[str] | None, targets: list[int], names: list[str]
) -> list[str] | None:
    """Our labels spelled as the service has them (class names or integer codes), or None when
    neither matches, in which case the label check is skipped rather than failing."""
    if not table_labels:
        return None
    seen = set(table_labels)
    if seen <= set(names):
        return [names[t] for t in targets]
    if seen <= {str(i) for i in range(len(names))}:
        return [str(t) for t in targets]
    return None


def mapping_params(cfg: TrainConfig) -> dict[str, Any]:
    """The quantile mapping's caps, when set (the temperature travels on its own)."""
    return {k: v for k, v in (("low", cfg.quantile_low), ("high", cfg.quantile_high)) if v is not None}


def load_scores(cfg: TrainConfig) -> tuple[ScoreTable, dict[str, Any]]:
    if cfg.scores_file:
        if not Path(cfg.scores_file).is_file():
            raise FileNotFoundError(f"scores file not found: {cfg.scores_file}")
        table = read_table(cfg.scores_file)
        source = {"source": "file", "path": str(cfg.scores_file)}
    elif cfg.service_url and cfg.dataset_id:
        from trainer.client import DifficultyClient

        with DifficultyClient(cfg.service_url, cfg.api_key, cache_dir=cfg.cache_dir) as client:
            fetched = client.fetch_scores(cfg.dataset_id)
        table = fetched.table
        fit = fetched.dataset.get("fit") or {}
        source = {
            "source": "service",
            "service_url": cfg.service_url,
            "dataset_id": cfg.dataset_id,
            "fit_id": fetched.fit_id,
            "encoder": fit.get("encoder") or fetched.dataset.get("encoder"),
        }
    else:
        raise ValueError(
            "the difficulty-aware loss needs scores: give --service-url and --dataset-id, or --scores-file"
        )
    scores = ScoreTable.from_arrow(table, cfg.score_column)
    source.update(column=cfg.score_column, num_scores=len(scores), score_max=float(scores.scores.max()),
                  score_std=float(scores.scores.std()), clip_quantile=cfg.clip_quantile)  # fmt: skip
    if cfg.clip_quantile is not None:
        scores = scores.clipped(cfg.clip_quantile)
        source["clipped_at"] = float(scores.scores.max())
    return scores, source


@dataclass
class Data:
    train: Split
    test: Split
    val: Split | None
    train_ids: list[str]  # sample IDs (what the service's scores are keyed by)
    train_targets: list[int]
    classes: list[str]
    black: float  # the value black pixels have after normalisation (fills shifted-in edges)


def load_data(cfg: TrainConfig) -> Data:
    if cfg.data == "fmnist":
        from trainer.fmnist import CLASSES, load_fashion_mnist

        images, labels = load_fashion_mnist("train", cfg.fmnist_dir)
        train_idx, val_idx = fmnist_train_indices(len(labels), cfg.train_subset, cfg.val_size)
        test_images, test_labels = load_fashion_mnist("test", cfg.fmnist_dir)
        test_idx = np.arange(len(test_labels))
        if cfg.test_subset is not None and cfg.test_subset < len(test_idx):
            test_idx = np.sort(
                np.random.default_rng(SUBSET_SEED + 2).permutation(len(test_idx))[: cfg.test_subset]
            )
        names = list(CLASSES)

        def split(imgs: np.ndarray, labs: np.ndarray, idx: np.ndarray) -> Split:
            x, y = _fmnist_tensors(imgs, labs, idx)
            return Split(TensorDataset(x, y), len(names), 1, (x, y))

        return Data(
            train=split(images, labels, train_idx),
            test=split(test_images, test_labels, test_idx),
            val=split(images, labels, val_idx) if cfg.val_size else None,
            train_ids=[str(i) for i in train_idx],  # the row index: the default upload IDs
            train_targets=labels[train_idx].tolist(),
            classes=names,
            black=-FMNIST_MEAN / FMNIST_STD,
        )
    if not Path(cfg.data).is_dir():
        raise ValueError(f"--data must be 'fmnist' or an ImageFolder directory, got {cfg.data!r}")
    full = _image_folder(cfg.data, cfg)
    names = list(full.classes)
    channels = 1 if cfg.grayscale else 3
    ids = image_folder_sample_ids(full)
    targets = [t for _, t in full.samples]
    if cfg.test_data:
        test_set = _image_folder(cfg.test_data, cfg)
        if list(test_set.classes) != names:
            raise ValueError(
                f"test classes {test_set.classes} differ from training classes {names}"
            )
        train_idx = np.arange(len(full))
    else:
        order = np.random.default_rng(SUBSET_SEED).permutation(len(full))
        n_test = max(1, int(round(cfg.test_fraction * len(full))))
        test_set = Subset(full, np.sort(order[:n_test]).tolist())
        train_idx = np.sort(order[n_test:])
    val_set = None
    if cfg.val_size:
        if cfg.val_size >= len(train_idx):
            raise ValueError(f"--val-size {cfg.val_size} leaves no training samples")
        shuffled = np.random.default_rng(SUBSET_SEED + 3).permutation(train_idx)
        val_set = Subset(full, np.sort(shuffled[: cfg.val_size]).tolist())
        train_idx = np.sort(shuffled[cfg.val_size :])
    if cfg.train_subset is not None and cfg.train_subset < len(train_idx):
        train_idx = np.sort(
            np.random.default_rng(SUBSET_SEED + 1).permutation(train_idx)[: cfg.train_subset]
        )
    if cfg.test_subset is not None and cfg.test_subset < len(test_set):
        # Random, not the first N: ImageFolder lists samples class by class.
        pick = np.random.default_rng(SUBSET_SEED + 2).permutation(len(test_set))[: cfg.test_subset]
        test_set = Subset(test_set, np.sort(pick).tolist())
    return Data(
        train=Split(Subset(full, train_idx.tolist()), len(names), channels),
        test=Split(test_set, len(names), channels),
        val=Split(val_set, len(names), channels) if val_set is not None else None,
        train_ids=[ids[i] for i in train_idx],
        train_targets=[targets[i] for i in train_idx],
        classes=names,
        black=-1.0,  # Normalize(0.5, 0.5)
    )


# -- training -------------------------------------------------------------------------------


def _batches(
    split: Split, wrapped: Any, cfg: TrainConfig, device: torch.device, generator: torch.Generator
):
    """Yields ``(x, y, index)`` batches; in-memory tensors skip the per-item DataLoader cost."""
    if split.tensors is not None:
        x_all, y_all = split.tensors
        positions = torch.as_tensor(wrapped.positions)
        x_all, y_all = x_all[positions].to(device), y_all[positions].to(device)
        n = len(positions)

        def epoch():
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                yield x_all[idx], y_all[idx], idx

        return epoch, math.ceil(n / cfg.batch_size)
    loader = DataLoader(
        wrapped, batch_size=cfg.batch_size, shuffle=True, generator=generator,
        num_workers=cfg.workers, drop_last=False,
    )  # fmt: skip

    def epoch():
        for x, y, idx in loader:
            yield x.to(device, non_blocking=True), y.to(device), idx.to(device)

    return epoch, len(loader)


def augment_batch(x: Tensor, pad: int = 2, fill: float = 0.0) -> Tensor:
    """Random horizontal flip and translation by up to ``pad`` pixels, per sample, on device.
    Edges shifted in take ``fill`` (the normalised value of black, as padding a raw image with
    zeros would give; normalised 0 would be a grey the test images never show)."""
    n = x.shape[0]
    flip = torch.rand(n, device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    shift = (torch.randint(-pad, pad + 1, (n, 2), device=x.device).float() * 2) / x.shape[-1]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    shifted = F.grid_sample(x - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return shifted + fill


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr or 0.05, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0,
        )  # fmt: skip
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=cfg.lr or 1e-3, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr or 1e-3, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd, adam, adamw)")


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "step":  # /10 at 50% and 75% of training, as in the paper's recipes
        return torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2, (3 * total) // 4], 0.1)
    if cfg.schedule == "none":
        return None
    raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine, step, none)")


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, device: torch.device, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (float64) and labels of a split, in order."""
    model.eval()
    probs, labels = [], []
    if split.tensors is not None:
        x_all, y_all = split.tensors
        for start in range(0, len(y_all), batch_size):
            logits = model(x_all[start : start + batch_size].to(device)).float()
            probs.append(torch.softmax(logits.double(), -1).cpu())
        labels = [y_all]
    else:
        for x, y in DataLoader(split.dataset, batch_size=batch_size):
            probs.append(torch.softmax(model(x.to(device)).double(), -1).cpu())
            labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def _ood_split(cfg: TrainConfig, test: Split) -> tuple[str, Split] | None:
    if cfg.ood == "none":
        return None
    if cfg.ood == "noise":
        # Uniform-noise images in the test images' value range: a synthetic OOD control that
        # needs no second dataset. Seeded separately so it is the same set for every run.
        if test.tensors is not None:
            x0 = test.tensors[0]
        else:  # the range over a fixed sample of test images, not over whichever comes first
            picks = np.random.default_rng(SUBSET_SEED).permutation(len(test.dataset))[:64]
            x0 = torch.stack([test.dataset[int(i)][0] for i in picks])
        n = min(len(test.dataset), 2000)
        g = torch.Generator().manual_seed(SUBSET_SEED)
        lo, hi = float(x0.min()), float(x0.max())
        x = torch.rand((n, *x0.shape[1:]), generator=g) * (hi - lo) + lo
        y = torch.zeros(n, dtype=torch.long)
        return "uniform-noise", Split(
            TensorDataset(x, y), test.num_classes, test.in_channels, (x, y)
        )
    if Path(cfg.ood).is_dir():
        return cfg.ood, Split(_image_folder(cfg.ood, cfg), test.num_classes, test.in_channels)
    raise ValueError(f"--ood must be 'noise', 'none' or an ImageFolder directory, got {cfg.ood!r}")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training + evaluation; returns the report (also written when output_dir is set)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    train_split, test_split = data.train, data.test
    ids, targets, names = data.train_ids, data.train_targets, data.classes

    scores_info: dict[str, Any] | None = None
    if cfg.loss == "difficulty":
        scores, scores_info = load_scores(cfg)
        wrapped: Any = ScoredDataset(
            train_split.dataset, ids, scores, mapping=cfg.mapping,
            temperature=cfg.temperature if cfg.temperature == "auto" else float(cfg.temperature),
            mapping_params=mapping_params(cfg),
            missing=cfg.missing,  # type: ignore[arg-type]
            base_labels=_label_strings(scores.labels, targets, names),
        )  # fmt: skip
        mean_weight = float(wrapped.weights.mean())
        scores_info.update(wrapped.weight_mapping.describe())
        scores_info.update(
            temperature=wrapped.temperature, temperature_setting=cfg.temperature, alpha=cfg.alpha,
            missing_policy=cfg.missing, missing=wrapped.num_missing, trained_on=len(wrapped),
            # Over the samples trained on (a missing one counts 0); constant ER at the same
            # average penalty is CE - beta * H with this beta.
            mean_weight=mean_weight, mean_weight_table=wrapped.weight_mapping.mean_weight,
            matched_er_beta=cfg.alpha * mean_weight,
        )  # fmt: skip
    else:
        wrapped = IndexedDataset(train_split.dataset)

    side = 28 if cfg.data == "fmnist" else cfg.image_size
    model = build_model(cfg.model, train_split.in_channels, train_split.num_classes, side).to(device)
    loss_fn = build_loss(
        cfg.loss, smoothing=cfg.smoothing, gamma=cfg.gamma, beta=cfg.beta, alpha=cfg.alpha,
        weights=wrapped.weights,
    ).to(device)  # fmt: skip
    opt = _optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    epoch_batches, steps_per_epoch = _batches(train_split, wrapped, cfg, device, generator)
    sched = _scheduler(opt, cfg, steps_per_epoch)

    history = []
    start = time.perf_counter()
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch, disable=not cfg.progress, unit="step",
        desc=f"train {cfg.loss}", file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    for epoch in range(cfg.epochs):
        model.train()
        total, count = torch.zeros((), device=device), 0
        for x, y, idx in epoch_batches():
            if cfg.augment:
                x = augment_batch(x, fill=data.black)
            loss = loss_fn(model(x).float(), y, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach() * len(y)  # no .item(): keeps the GPU from syncing every step
            count += len(y)
            bar.update(1)
        mean = float(total) / max(count, 1)
        if not math.isfinite(mean):
            raise FloatingPointError(
                f"training loss became {mean} in epoch {epoch + 1}; lower --lr"
            )
        history.append({"epoch": epoch + 1, "loss": mean})
        bar.set_postfix(loss=f"{mean:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - start

    val_results = None
    if data.val is not None:
        val_probs, val_labels = predict(model, data.val, device)
        val_results = M.classification_metrics(val_probs, val_labels)
    probs, labels = predict(model, test_split, device)
    results = M.classification_metrics(probs, labels)
    ood = _ood_split(cfg, test_split)
    ood_info: dict[str, Any] = {
        "dataset": None,
        "positive_class": "in-distribution",
        "score": "max softmax probability",
    }
    if ood is not None:
        ood_probs, _ = predict(model, ood[1], device)
        results.update(M.ood_metrics(probs, ood_probs))
        ood_info["dataset"] = ood[0]
        ood_info["num_samples"] = len(ood_probs)
    else:
        results.update(ood_auroc=None, fpr_at_95_tpr=None)

    report = {
        "metrics": results,
        "val_metrics": val_results,
        "metric_conventions": {
            "ece": "top-label, 15 equal-width bins (lo, hi], L1",
            "adaptive_ece": "15 equal-mass bins",
            "brier": "sum over classes, mean over samples",
            "aurc": "risk = 0/1 error, ranked by max probability, mean over all coverages",
            "misclassification_auroc": "positive = correctly classified, score = max probability",
        },
        "ood": ood_info,
        "train": {
            "samples": len(wrapped),
            "test_samples": int(len(labels)),
            "epochs": cfg.epochs,
            "steps": cfg.epochs * steps_per_epoch,
            "seconds": train_seconds,
            "history": history,
        },
        "scores": scores_info,
        "classes": names,
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "environment": {"torch": torch.__version__, "device": str(device)},
    }
    if cfg.output_dir:
        write_outputs(report, probs, labels, Path(cfg.output_dir), [(_run_title(report), probs)])
    report["_probs"], report["_labels"] = probs, labels  # for in-process callers; not in JSON
    return report


def train_with_comparison(cfg: TrainConfig, compare: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """:func:`train`, plus the same run with each loss in ``compare`` (e.g. ``["ce"]``): same
    data, seed, model and schedule. The report gains ``compare`` (their metrics) and the
    reliability diagram shows the runs side by side."""
    others = [name for name in dict.fromkeys(compare) if name != cfg.loss]
    report = train(replace(cfg, output_dir=None))
    panels = [(_run_title(report), report["_probs"])]
    compared: dict[str, Any] = {}
    for name in others:
        other = train(replace(cfg, loss=name, output_dir=None))
        compared[name] = {k: other[k] for k in ("metrics", "val_metrics", "train", "config")}
        panels.append((_run_title(other), other["_probs"]))
    if compared:
        report["compare"] = compared
    if cfg.output_dir:
        write_outputs(report, report["_probs"], report["_labels"], Path(cfg.output_dir), panels)
    return report


def _run_title(report: dict[str, Any]) -> str:
    c, s = report["config"], report.get("scores")
    if c["loss"] == "difficulty" and s:
        return f"difficulty ({s['mapping']}, alpha={c['alpha']:g}, mean w={s['mean_weight']:.2f})"
    return {"ls": f"ls (eps={c['smoothing']:g})", "focal": f"focal (gamma={c['gamma']:g})",
            "er": f"er (beta={c['beta']:g})"}.get(c["loss"], c["loss"])  # fmt: skip


def write_outputs(
    report: dict[str, Any], probs: np.ndarray, labels: np.ndarray, out: Path,
    panels: list[tuple[str, np.ndarray]] | None = None,
) -> None:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    clean = _finite({k: v for k, v in report.items() if not k.startswith("_")})
    tmp = out / ".report.json.tmp"
    # allow_nan=False: an undefined metric (e.g. misclassification AUROC with no errors) is
    # written as null, so strict JSON readers can parse every report.
    tmp.write_text(json.dumps(clean, indent=2, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, out / "report.json")
    reliability_diagram(panels or [(report["config"]["loss"], probs)], labels, out / "reliability.png")


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def reliability_diagram(
    panels: list[tuple[str, np.ndarray]], labels: np.ndarray, path: Path
) -> None:
    """One column per run (title, probabilities), on the same test labels: accuracy per
    confidence bin with the gap to the diagonal hatched, and the bins' shares below."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(panels), figsize=(4.5 * len(panels), 5.5), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
    )  # fmt: skip
    for column, (title, probs) in enumerate(panels):
        top, bottom = axes[0, column], axes[1, column]
        bins = M.reliability_bins(probs, labels)
        edges, width = bins["edges"][:-1], 1.0 / len(bins["count"])
        centers = edges + width / 2
        acc = np.nan_to_num(bins["accuracy"])
        conf = np.nan_to_num(bins["confidence"], nan=0.0)
        top.bar(centers, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        gap_base = np.minimum(acc, conf)
        # The gap between accuracy and mean confidence, hatched (over- or under-confidence).
        filled = bins["count"] > 0
        top.bar(centers[filled], np.abs(conf - acc)[filled], bottom=gap_base[filled], width=width,
                fill=False, hatch="//", edgecolor="tab:red", label="gap to confidence")  # fmt: skip
        top.plot([0, 1], [0, 1], "k--", linewidth=1)
        top.set_ylabel("accuracy")
        top.set_ylim(0, 1)
        top.legend(loc="upper left", fontsize=8)
        top.set_title(
            f"{title}\nECE={M.ece(probs, labels):.4f}  acc={M.accuracy(probs, labels):.4f}",
            fontsize=9,
        )
        bottom.bar(
            centers, bins["count"] / bins["count"].sum(), width=width, color="gray", edgecolor="black"
        )
        bottom.set_xlabel("confidence (max probability), 15 bins")
        bottom.set_ylabel("share")
        bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
