"""Training-step time: difficulty-aware loss vs plain cross-entropy, side by side in one run.

A step = forward + loss + backward + optimiser step on one batch. Each arm (CE, difficulty-aware,
and optionally the same loss from torch ops and a second CE) trains its own copy of one model on
the same batches, the arms rotating step by step so drift on a shared machine hits all equally;
the table shows medians, their ratio to CE, and the median of the paired per-step ratios. The
budget: difficulty-aware <= 1.05 x CE. The weights come from the default mapping; any mapping
gives the same step, since the weights are a table computed once before training and a step
only gathers from it.

    python benchmarks/bench_trainer_step.py                       # CPU: MLP, small CNN, ResNet-18
    python benchmarks/bench_trainer_step.py --threads 1 --steps 3000 --cases 'mlp 1x28x28' --torch-ops --control
    python benchmarks/bench_trainer_step.py --device cuda --steps 200 --batch-size 128 --control
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from trainer.losses import CrossEntropyLoss, DifficultyAwareLoss
from trainer.models import build_model

CASES = {
    # name: (model, channels, image side) — Fashion-MNIST-sized and CIFAR-sized inputs.
    "mlp 1x28x28": ("mlp", 1, 28),
    "small-cnn 1x28x28": ("small-cnn", 1, 28),
    "resnet18 3x32x32": ("resnet18", 3, 32),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The arms besides CE, with their column labels, in table order.
ARM_LABELS = {"difficulty": "DA ms", "difficulty_torch_ops": "ops ms", "ce_control": "CE2 ms"}


def arms(args: argparse.Namespace) -> list[str]:
    """The arms a run times besides CE, from its flags."""
    on = {"difficulty": True, "difficulty_torch_ops": args.torch_ops, "ce_control": args.control}
    return [arm for arm in ARM_LABELS if on[arm]]


def bench_case(
    model_name: str, channels: int, side: int, args: argparse.Namespace, device: torch.device
) -> dict:
    torch.manual_seed(0)
    n_train = 50_000  # weight table of a CIFAR-sized training set
    base = build_model(model_name, channels, 10, side).to(device)
    difficulty = DifficultyAwareLoss.from_scores(torch.randn(n_train).numpy()).to(device)
    candidates = {
        "difficulty": difficulty,
        # The same loss through torch ops only (what a GPU runs), to show what the CPU kernel buys.
        "difficulty_torch_ops": lambda z, y, i: difficulty.per_sample(z, y, i).mean(),
        # A second CE arm: its ratio to the first is the method's own bias and noise.
        "ce_control": CrossEntropyLoss().to(device),
    }
    losses = {"ce": CrossEntropyLoss().to(device)} | {arm: candidates[arm] for arm in arms(args)}
    # Every arm its own copy (the first model built is not special in memory either).
    models = {k: copy.deepcopy(base) for k in losses}
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for k, m in models.items()
    }
    x = torch.randn(args.batch_size, channels, side, side, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    times: dict[str, list[float]] = {k: [] for k in losses}

    def step(kind: str) -> float:
        idx = torch.randint(0, n_train, (args.batch_size,), device=device)
        sync(device)
        t0 = time.perf_counter()
        loss = losses[kind](models[kind](x), y, idx)
        opts[kind].zero_grad(set_to_none=True)
        loss.backward()
        opts[kind].step()
        sync(device)
        return time.perf_counter() - t0

    kinds = list(losses)
    for _ in range(args.warmup):
        for kind in kinds:
            step(kind)
    for i in range(args.steps):
        # Rotate which goes first so none always runs on a warmer cache.
        for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            times[kind].append(step(kind))
    ce = statistics.median(times["ce"])
    row = {"ce_ms": ce * 1e3}
    for kind in kinds[1:]:
        da = statistics.median(times[kind])
        # Each DA step against the CE step next to it in time: on a shared machine, load changes
        # from second to second, and a paired ratio cancels most of it.
        paired = statistics.median(d / c for d, c in zip(times[kind], times["ce"], strict=True))
        row |= {f"{kind}_ms": da * 1e3, f"{kind}_ratio": da / ce, f"{kind}_paired_ratio": paired}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--torch-ops",
        action="store_true",
        help="also time the difficulty-aware loss built from torch ops (the GPU path) on the CPU",
    )
    parser.add_argument(
        "--control", action="store_true", help="also time a second CE model (the noise floor)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = {}
    # On a shared machine the numbers mean little without the load they were taken under.
    load_before = os.getloadavg()
    print(
        f"device={device} batch={args.batch_size} steps={args.steps} threads={torch.get_num_threads()} "
        f"(median per step); load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )
    columns = arms(args)
    header = "".join(f"{ARM_LABELS[arm]:>10}{'/CE':>7}{'paired':>8}" for arm in columns)
    print(f"{'case':<22}{'CE ms':>10}{header}")
    for name in args.cases:
        row = bench_case(*CASES[name], args, device)
        rows[name] = row
        cells = "".join(
            f"{row[f'{arm}_ms']:>10.2f}{row[f'{arm}_ratio']:>7.3f}{row[f'{arm}_paired_ratio']:>8.3f}"
            for arm in columns
        )
        print(f"{name:<22}{row['ce_ms']:>10.2f}{cells}", flush=True)
    load_after = os.getloadavg()
    print(f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": str(device),
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "threads": torch.get_num_threads(),
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    "results": rows,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
