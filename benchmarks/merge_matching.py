"""Permutation matching on two MLPs trained from different seeds (issue 22): loss / accuracy barrier on the
linear path before and after weight matching and activation matching, and the alignment of each layer's
top singular vectors before and after.

Data: scikit-learn's digits (8x8 images, 10 classes; offline), a fixed 80/20 split; MLP 64-512-512-512-10
with ReLU, Adam (lr 1e-3, batch 64) for a fixed number of epochs; each pair of seeds is one repetition.

    python benchmarks/merge_matching.py --pairs 3 --epochs 40 --threads 2
    python benchmarks/merge_matching.py --render       # the BENCHMARKS.md table from the results JSON
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from rankwise.linalg.assignment import singular_alignment
from rankwise.merging.barrier import barrier
from rankwise.merging.matching import match

OUT = Path(__file__).parent / "results" / "merge_matching.json"


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    cut = int(0.8 * len(y))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def train(seed: int, data, epochs: int) -> nn.Module:
    model = mlp(seed)
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def alignment(a: nn.Module, b: nn.Module, k: int = 10) -> list[float]:
    """Mean |cos| of the top-k left and right singular vectors, per linear layer."""
    out = []
    for la, lb in zip(a, b):
        if isinstance(la, nn.Linear):
            r = singular_alignment(la.weight, lb.weight, k)
            out.append((r["u_mean"] + r["v_mean"]) / 2)
    return out


def run_pair(sa: int, sb: int, epochs: int, alphas: int) -> dict:
    tr, te = digits()
    t0 = time.perf_counter()
    a, b = train(sa, tr, epochs), train(sb, tr, epochs)
    t_train = time.perf_counter() - t0
    rows = {}
    for name, fn in (("naive", lambda: (b, None)), ("weight", lambda: match(a, b, method="weight")),
                     ("activation", lambda: match(a, b, data=tr[0], method="activation"))):
        t = time.perf_counter()
        bm, res = fn()
        secs = time.perf_counter() - t
        bar = barrier(a, bm, te, alphas)
        rows[name] = {"loss_barrier": bar.barrier, "acc_barrier": bar.accuracy_barrier, "losses": bar.losses,
                      "accuracies": bar.accuracies, "alignment": alignment(a, bm), "match_seconds": secs,
                      "sweeps": None if res is None else res.sweeps}
    return {"seeds": [sa, sb], "epochs": epochs, "train_seconds": t_train, "rows": rows,
            "endpoint_test_acc": [rows["naive"]["accuracies"][0], rows["naive"]["accuracies"][-1]]}


def render(res: dict) -> str:
    pairs = res["pairs"]
    lines = ["| matching | loss barrier (mean, min-max) | vs naive | accuracy barrier (mean) | top-10 singular-vector "
             "alignment per layer (mean |cos|) |", "|---|---:|---:|---:|---|"]
    naive = statistics.fmean(p["rows"]["naive"]["loss_barrier"] for p in pairs)
    for name in ("naive", "weight", "activation"):
        lb = [p["rows"][name]["loss_barrier"] for p in pairs]
        ab = [p["rows"][name]["acc_barrier"] for p in pairs]
        al = [statistics.fmean(p["rows"][name]["alignment"][i] for p in pairs) for i in range(4)]
        lines.append(f"| {name} | {statistics.fmean(lb):.4f} ({min(lb):.4f}-{max(lb):.4f}) | "
                     f"{statistics.fmean(lb) / naive:.3f}x | {100 * statistics.fmean(ab):.2f} pts | "
                     + ", ".join(f"{x:.3f}" for x in al) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--alphas", type=int, default=11)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.out.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [run_pair(2 * i, 2 * i + 1, args.epochs, args.alphas) for i in range(args.pairs)]
    res = {"command": "python benchmarks/merge_matching.py " + " ".join(
        f"--{k} {v}" for k, v in (("pairs", args.pairs), ("epochs", args.epochs), ("alphas", args.alphas))),
        "torch_threads": torch.get_num_threads(), "pairs": pairs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res))


if __name__ == "__main__":
    main()
