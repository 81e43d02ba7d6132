"""Benchmark: every method at every noise ratio, one seed and one budget, printed as the papers' tables are.

    python bench.py                         # embedded data, tiny CLIP, CPU (2 cores: see the README for the time)
    python bench.py --quick                 # CI size: small generated data, 1 epoch, noise 0.4 (2-3 min on 2 cores)
    python bench.py --methods baseline sdd --noise 0.4 0.8
    python bench.py --dataset f30k --data-root /data/f30k --nproc 8   # the paper's table, ViT-B-32 'openai', 8 GPUs

Each run is the method's own script in a subprocess, with the dataset's defaults and the same seed, noise seed,
epochs and batch size for all (the budget); each method keeps its own learning rate and settings. Runs go to
<out-dir>/<method>-n<noise>/ with their log, checkpoints and results.json. A run whose results.json and bench.json
show the same command and the same source code is reused, so a stopped bench goes on where it stopped (--fresh:
run everything again). The table goes to <out-dir>/table.md and everything to <out-dir>/bench.json.

Columns: the six recalls and rSum on the test split (best dev epoch); rSum as a share of the clean-only upper
bound at the same noise (baseline.py --clean-only; at noise 0 the baseline is that bound); noise-detection ROC-AUC
of the clean/noisy split against the true mask (npc: its memory bank's GMM on the starting model; sdd: w_con of the
last epoch; nlip: 1 - eps of the last epoch); wall time per epoch (the whole run, set-up, memory banks, scans,
evaluation included, divided by its epochs) and its ratio to the baseline's at the same noise; peak memory (CPU: the
process's peak resident memory; CUDA: peak allocated tensors of rank 0).
NLIP is a pre-training method (its own defaults train from scratch); here it fine-tunes the same pre-trained CLIP as
the others with the shared defaults, so that the rows compare.
"""
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import data
import embedded

ROOT = Path(__file__).resolve().parent
METHODS = {"clean": ["baseline.py", "--clean-only"], "baseline": ["baseline.py"], "npc": ["npc.py"], "sdd": ["sdd.py"],
           "nlip": ["nlip.py"]}  # the table's rows, in order; clean (the upper bound) first
QUICK = {"sizes": {"pretrain": 600, "train": 240, "dev": 100, "test": 100}, "epochs": 1, "batch_size": 32, "warmup": 3}

p = common.Parser(__doc__)
p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which rows (default: all)")
p.add_argument("--noise", nargs="+", type=float, help="noise ratios in [0, 1) (default: 0 0.2 0.4 0.6 0.8; --quick: 0.4)")
p.add_argument("--dataset", default="embedded", choices=data.DATASETS, help="which data (default: embedded)")
p.add_argument("--data-root", help="dataset folder (embedded: data/embedded, or a small one of its own with --quick)")
p.add_argument("--epochs", type=int, help="epochs of every run (default: the dataset's)")
p.add_argument("--batch-size", type=int, help="batch of every run (default: the dataset's)")
p.add_argument("--seed", type=int, default=99, help="training seed of every run")
p.add_argument("--noise-seed", type=int, default=0, help="noise permutation seed of every run")
p.add_argument("--device", help="passed to every run (default: cuda if available)")
p.add_argument("--nproc", type=int, default=1, help="processes per run; above 1 each run goes through torchrun")
p.add_argument("--out-dir", help="default: out/bench-<dataset> (out/bench-quick with --quick)")
p.add_argument("--quick", action="store_true", help="CI size: small data, 1 epoch, noise 0.4 unless --noise is given")
p.add_argument("--fresh", action="store_true", help="rerun every run, even those already finished")


def source_hash():
    """Digest of the code every run executes: a change to any of it makes finished runs stale."""
    files = sorted(f for f in ROOT.glob("*.py") if f.name not in ("bench.py", "eval.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def command(method, noise, args, budget):
    """The argv of one run (without --out-dir)."""
    script, *flags = METHODS[method]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                                 if args.nproc > 1 else [])
    argv = launch + [str(ROOT / script), *flags, "--dataset", args.dataset, "--noise", f"{noise:g}", "--seed", str(args.seed),
                     "--noise-seed", str(args.noise_seed), "--epochs", str(budget["epochs"]),
                     "--batch-size", str(budget["batch_size"]), "--warmup", str(budget["warmup"])]
    argv += ["--data-root", str(args.data_root)] if args.data_root else []
    argv += ["--device", args.device] if args.device else []
    if method == "nlip":  # fine-tune the shared pre-trained CLIP at the shared lr (its own defaults: from scratch)
        argv += ["--pretrained", budget["pretrained"], "--lr", str(budget["lr"]), "--wd", "0.2"]
    return argv


def portable(argv):
    """argv with the interpreter and the scripts by name only: a run done in another checkout of the same code counts."""
    return [Path(argv[0]).name] + [Path(a).name if a.endswith(".py") else a for a in argv[1:]]


def run(method, noise, args, budget, code):
    """Run (or reuse) one cell -> dict with results.json, wall seconds and the command."""
    out = Path(args.out_dir) / f"{method}-n{noise:g}"
    argv = command(method, noise, args, budget)
    key = {"argv": argv, "code": code}
    if not args.fresh and (out / "results.json").is_file() and (out / "bench.json").is_file():
        done = json.loads((out / "bench.json").read_text())
        if (portable(done["argv"]), done["code"]) == (portable(argv), code):
            print(f"{method:>8} noise {noise:g}: reused {out}", flush=True)
            return dict(done, results=json.loads((out / "results.json").read_text()))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"{method:>8} noise {noise:g}: {' '.join(argv[1:])} --out-dir {out}", flush=True)
    t0 = time.time()
    p = subprocess.run(argv + ["--out-dir", str(out)], capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"{method:>8} noise {noise:g}: FAILED (exit {p.returncode}): {tail}", flush=True)
        return None
    done = dict(key, wall_s=wall, finished=time.strftime("%Y-%m-%d %H:%M"))
    data.atomic_write(out / "bench.json", lambda f: f.write(json.dumps(done, indent=1).encode()))
    print(f"{method:>8} noise {noise:g}: done in {wall / 60:.1f} min", flush=True)
    return dict(done, results=json.loads((out / "results.json").read_text()))


def detection_auc(method, res):
    """ROC-AUC of the method's clean/noisy split against the true mask (None: no split, or no noise)."""
    if method == "npc":
        return res["memory_bank"]["auc"]
    last = res["history"][-1]
    return {"sdd": last.get("w_con_auc"), "nlip": last.get("eps_auc")}.get(method)


def table(cells, methods, noises):
    """The markdown table: one block of rows per noise ratio."""
    head = ("| noise | method | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rSum | % of clean-only | detection AUC "
            "| s / epoch | x baseline | peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for noise in noises:
        ref = cells.get(("clean", noise) if noise > 0 else ("baseline", noise))
        base = cells.get(("baseline", noise))
        for m in methods:
            c = cells.get((m, noise))
            if m == "clean" and noise == 0:
                continue  # the baseline at noise 0 trains on the clean pairs
            if c is None:
                lines.append(f"| {noise:g} | {m} | failed or not run |" + " |" * 11)
                continue
            r, res = c["results"]["test"], c["results"]
            per_epoch = c["wall_s"] / res["args"]["epochs"]
            auc = detection_auc(m, res)
            lines.append("| " + " | ".join([
                f"{noise:g}", m, *(f"{r[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")),
                f"{100 * r['rsum'] / ref['results']['test']['rsum']:.1f}" if ref else "",
                f"{auc:.3f}" if auc is not None else "-", f"{per_epoch:.1f}",
                f"{per_epoch / (base['wall_s'] / base['results']['args']['epochs']):.2f}" if base else "",
                f"{res.get('peak_memory_gib', float('nan')):.2f}"]) + " |")
    return "\n".join(lines)


def main():
    args = p.parse_args()
    noises = args.noise or ([0.4] if args.quick else [0.0, 0.2, 0.4, 0.6, 0.8])
    if not all(0 <= n < 1 for n in noises):
        raise data.UserError(f"--noise must be in [0, 1), got {noises}")
    if args.nproc < 1:
        raise data.UserError(f"--nproc must be at least 1, got {args.nproc}")
    args.out_dir = args.out_dir or f"out/bench-{'quick' if args.quick else args.dataset}"
    defaults = dict(common.EMBEDDED if args.dataset == "embedded" else common.REAL)
    if args.dataset == "embedded":
        args.data_root = args.data_root or (f"{args.out_dir}/data" if args.quick else defaults["data_root"])
        if args.quick:  # a small dataset and a briefly pre-trained tiny CLIP (as the tests use)
            embedded.ensure_embedded(args.data_root, QUICK["sizes"])
            embedded.pretrain_tiny(args.data_root, torch.device("cpu"), steps=150, batch_size=64, warmup=15)
        defaults["pretrained"] = embedded.prepare(args.data_root, torch.device("cpu"))
    elif args.data_root is None:
        raise data.UserError(f"--data-root is required for --dataset {args.dataset}")
    budget = {k: defaults[k] for k in ("model", "pretrained", "epochs", "batch_size", "lr", "warmup")}  # what every run shares
    budget.update({k: QUICK[k] for k in ("epochs", "batch_size", "warmup")} if args.quick else {})
    budget.update({k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None})
    code, methods = source_hash(), [m for m in METHODS if m in args.methods]  # clean first: the reference
    print(f"bench: {methods} x noise {noises}, budget {budget}, out {args.out_dir}", flush=True)

    cells = {}
    for noise in noises:
        for m in methods:
            if not (m == "clean" and noise == 0):
                cells[(m, noise)] = run(m, noise, args, budget, code)
    md = table(cells, methods, noises)
    print(md)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    data.atomic_write(Path(args.out_dir) / "table.md", lambda f: f.write((md + "\n").encode()))
    runs = [dict(method=m, noise=n, **(c or {"failed": True})) for (m, n), c in cells.items()]
    summary = {"budget": budget, "code": code, "runs": runs}
    data.atomic_write(Path(args.out_dir) / "bench.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    if any(c is None for c in cells.values()):
        raise data.UserError(f"{sum(c is None for c in cells.values())} runs failed; their logs are under {args.out_dir}")


if __name__ == "__main__":
    common.run(main)
