"""Benchmark: every method at every noise ratio, one budget, over training seeds, printed as the papers'
tables are.

    python bench.py                   # embedded data, tiny CLIP, CPU (2 cores: see the README for the time)
    python bench.py --quick           # CI size: small generated data, 1 epoch, noise 0.4 (2-3 min on 2 cores)
    python bench.py --methods baseline sdd --noise 0.4 0.8
    python bench.py --seeds 99 0 1 --noise 0.4     # three training seeds: rSum as mean +- sd
    # the paper's table, ViT-B-32 'openai', 8 GPUs
    python bench.py --dataset f30k --data-root /data/f30k --nproc 8
    # input pipeline
    python bench.py --input --dataset f30k --data-root out/f30k-like --fake-f30k 2000 --workers 2
    python bench.py --agreement       # NPC's look-ahead ratio under bf16 against fp32 training forwards

Each run is the method's own script in a subprocess, with the dataset's defaults and the same seed, noise
seed, epochs and batch size for all (the budget); each method keeps its own learning rate and settings. Runs
go to <out-dir>/<method>-n<noise>-s<seed>-<key>/ with their log, checkpoints and results.json, where <key>
digests the command and the code (its script and the project files it imports, without comments and
docstrings: a change to another method's script keeps it). A finished run of the same key is reused, a
stopped one resumed, so a stopped bench goes on where it stopped; a changed command or code runs in a new
folder and no finished run is ever deleted (--fresh: run everything again, each run replacing its own). The
table goes to <out-dir>/table.md and everything to <out-dir>/bench.json.

Columns, each the mean over the seeds (the noise seed stays fixed): the six recalls and rSum on the test split
(best dev epoch), rSum with its sample sd when there are several seeds; rSum as a share of the clean-only
upper bound at the same noise, from the means (baseline.py --clean-only; at noise 0 the baseline is that
bound);
noise-detection ROC-AUC of the clean/noisy split against the true mask (npc: its memory bank's GMM on the
starting model; sdd: w_con of the last epoch; nlip: 1 - eps of the last epoch); wall time per epoch (the
whole run, set-up, memory banks, scans, evaluation included, divided by its epochs) and its ratio to the
baseline's at the same noise; peak memory (CPU: the process's peak resident memory; CUDA: peak allocated
tensors of rank 0).
NLIP is a pre-training method (its own defaults train from scratch); here it fine-tunes the same
pre-trained CLIP as the others with the shared defaults, so that the rows compare.

--input: images/s of a training loader's images (shuffled, batch 256, --workers processes) at the
model's input size, decoded per sample with PIL and read from the decode-once cache, and the time to build
the cache.
--agreement: NPC's first look-ahead step (fresh AdamW, nc-tiny, 8 batches of 128 pairs with their memory
pairs, noise 0.4) with the training forward in fp32 and in bf16 autocast (CPU), at lr 1e-5 and 5e-4: the
share of pairs on which both agree about w < 1, with the memory losses in fp32 (npc.py, sdd.py) and in bf16
(their earlier form).
"""
import ast
import copy
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import torch

import baseline
import common
import data
import embedded
import npc
import runs

ROOT = Path(__file__).resolve().parent
# the table's rows, in order; clean (the upper bound) first. Those after nlip run only when asked for:
# baseline-long is the baseline given NPC's compute (COMPUTE_MATCHED times the epochs: NPC's step costs 13
# forward-equivalents a pair against a plain step's 3); then variants of NPC and NLIP
METHODS = {"clean": ["baseline.py", "--clean-only"], "baseline": ["baseline.py"], "npc": ["npc.py"],
           "sdd": ["sdd.py"], "nlip": ["nlip.py"], "baseline-long": ["baseline.py"],
           "npc-fixed": ["npc.py", "--fixed-bank"], "npc-w1": ["npc.py", "--no-lookahead"],
           "nlip-learned": ["nlip.py", "--learned-margin"], "nlip-syn0": ["nlip.py", "--synthetic-lam", "0"],
           "nlip-syn0.5": ["nlip.py", "--synthetic-lam", "0.5"],
           "nlip-warm0": ["nlip.py", "--warmup-epochs", "0"]}
DEFAULT_METHODS = ["clean", "baseline", "npc", "sdd", "nlip"]
COMPUTE_MATCHED = 13 / 3
QUICK = {"sizes": {"pretrain": 600, "train": 240, "dev": 100, "test": 100}, "epochs": 1, "batch_size": 32,
         "warmup": 3}

p = runs.OneLineParser(__doc__)
p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
               help=f"which rows (default: {' '.join(DEFAULT_METHODS)})")
p.add_argument("--noise", nargs="+", type=float,
               help="noise ratios in [0, 1) (default: 0 0.2 0.4 0.6 0.8; --quick: 0.4)")
p.add_argument("--dataset", default="embedded", choices=data.DATASETS, help="which data (default: embedded)")
p.add_argument("--data-root",
               help="dataset folder (embedded: data/embedded, or a small one of its own with --quick)")
p.add_argument("--epochs", type=int, help="epochs of every run (default: the dataset's)")
p.add_argument("--batch-size", type=int, help="batch of every run (default: the dataset's)")
p.add_argument("--seeds", nargs="+", type=int, default=[99], help="training seeds, each a run of every cell")
p.add_argument("--noise-seed", type=int, default=0, help="noise permutation seed of every run")
p.add_argument("--device", help="passed to every run (default: cuda if available)")
p.add_argument("--nproc", type=int, default=1,
               help="processes per run; above 1 each run goes through torchrun")
p.add_argument("--out-dir", help="default: out/bench-<dataset> (out/bench-quick with --quick)")
p.add_argument("--quick", action="store_true",
               help="CI size: small data, 1 epoch, noise 0.4 unless --noise is given")
p.add_argument("--fresh", action="store_true", help="rerun every run, even those already finished")
p.add_argument("--input", action="store_true",
               help="measure the input pipeline only (images/s, PIL against the cache)")
p.add_argument("--fake-f30k", type=int,
               help="with --input: first write this many generated 500x375 JPEGs as f30k")
p.add_argument("--workers", type=int, help="with --input: DataLoader worker processes (default: 2)")
p.add_argument("--agreement", action="store_true",
               help="measure the look-ahead ratio's bf16/fp32 agreement only")


def source_hash(method):
    """Digest of the code a method's runs execute: its script and the project files it imports, directly or
    through another (so captions.py counts for NLIP only), without comments and docstrings: a change to any
    of that code makes its finished runs stale, a change to the text alone does not."""
    files, todo = {}, [ROOT / METHODS[method][0]]
    while todo:
        f = todo.pop()
        files[f] = tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            local = [ROOT / f"{n}.py" for n in names]
            todo += [g for g in local if g.exists() and g not in files]
    for tree in files.values():  # drop the docstrings
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    code = "".join(ast.dump(files[f]) for f in sorted(files))
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def command(method, noise, seed, args, budget):
    """The argv of one run (without --out-dir)."""
    script, *flags = METHODS[method]
    launch = [sys.executable]
    if args.nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    epochs = budget["epochs"]
    if method == "baseline-long":
        epochs = round(epochs * COMPUTE_MATCHED)
    argv = launch + [str(ROOT / script), *flags, "--dataset", args.dataset, "--noise", f"{noise:g}",
                     "--seed", str(seed), "--noise-seed", str(args.noise_seed),
                     "--epochs", str(epochs), "--batch-size", str(budget["batch_size"]),
                     "--warmup", str(budget["warmup"])]
    argv += ["--data-root", str(args.data_root)] if args.data_root else []
    argv += ["--device", args.device] if args.device else []
    if script == "nlip.py":
        # fine-tune the shared pre-trained CLIP at the shared lr (its own defaults: from scratch)
        argv += ["--pretrained", budget["pretrained"], "--lr", str(budget["lr"]), "--wd", "0.2"]
    return argv


def portable(argv):
    """argv with the interpreter and the scripts by name only: a run done in another checkout of the same
    code counts."""
    return [Path(argv[0]).name] + [Path(a).name if a.endswith(".py") else a for a in argv[1:]]


def run(method, noise, seed, args, budget):
    """Run (or reuse) one cell and seed -> dict with results.json, wall seconds and the command. Its folder is
    named after the command and the code, so a changed command or code runs in a new folder and never
    replaces a finished run; a run of the same command that stopped is resumed."""
    argv = command(method, noise, seed, args, budget)
    code = source_hash(method)
    key = {"argv": argv, "code": code}
    digest = hashlib.sha256(json.dumps([portable(argv), code]).encode()).hexdigest()[:8]
    out = Path(args.out_dir) / f"{method}-n{noise:g}-s{seed}-{digest}"
    if not args.fresh and (out / "results.json").is_file() and (out / "bench.json").is_file():
        done = json.loads((out / "bench.json").read_text())
        print(f"{method:>8} noise {noise:g} seed {seed}: reused {out}", flush=True)
        return dict(done, results=json.loads((out / "results.json").read_text()))
    again = []
    if args.fresh and (out / "results.json").is_file():
        again = ["--overwrite"]  # asked for: the script keeps the old run until the new one has an epoch
    elif (out / "last.pt").is_file():
        again = ["--resume"]  # a run of this command that stopped
    out.mkdir(parents=True, exist_ok=True)
    print(f"{method:>8} noise {noise:g} seed {seed}: {' '.join(argv[1:])} --out-dir {out}", flush=True)
    t0 = time.time()
    p = subprocess.run(argv + ["--out-dir", str(out), *again], capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"{method:>8} noise {noise:g} seed {seed}: FAILED (exit {p.returncode}): {tail}", flush=True)
        return None
    done = dict(key, out=str(out), wall_s=wall, finished=time.strftime("%Y-%m-%d %H:%M"))
    data.atomic_write(out / "bench.json", lambda f: f.write(json.dumps(done, indent=1).encode()))
    print(f"{method:>8} noise {noise:g} seed {seed}: done in {wall / 60:.1f} min", flush=True)
    return dict(done, results=json.loads((out / "results.json").read_text()))


def detection_auc(method, res):
    """ROC-AUC of the method's clean/noisy split against the true mask (None: no split, or no noise)."""
    script = METHODS[method][0]
    if script == "npc.py":
        return res["memory_bank"]["auc"]
    last = res["history"][-1]
    return {"sdd.py": last.get("w_con_auc"), "nlip.py": last.get("eps_auc")}.get(script)


def summary(runs):
    """The mean over a cell's seeds of what the table shows, and rSum's sample sd (None for one seed)."""
    recalls = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    tests = [r["results"]["test"] for r in runs]
    aucs = [a for a in (detection_auc(r["method"], r["results"]) for r in runs) if a is not None]
    out = {k: float(np.mean([t[k] for t in tests])) for k in recalls}
    out["rsum_sd"] = float(np.std([t["rsum"] for t in tests], ddof=1)) if len(runs) > 1 else None
    out["auc"] = float(np.mean(aucs)) if aucs else None
    out["s_per_epoch"] = float(np.mean([r["wall_s"] / r["results"]["args"]["epochs"] for r in runs]))
    out["peak_gib"] = float(np.mean([r["results"].get("peak_memory_gib", np.nan) for r in runs]))
    out["seeds"] = len(runs)
    return out


def table(cells, methods, noises):
    """The markdown table: one block of rows per noise ratio, each row the mean over its seeds."""
    head = ("| noise | method | seeds | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rSum | % of clean-only "
            "| detection AUC | s / epoch | x baseline | peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    recalls = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    for noise in noises:
        rows = {m: summary(cells[(m, noise)]) for m in methods if cells.get((m, noise))}
        ref = rows.get("clean" if noise > 0 else "baseline")
        base = rows.get("baseline")
        for m in methods:
            if m == "clean" and noise == 0:
                continue  # the baseline at noise 0 trains on the clean pairs
            c = rows.get(m)
            if c is None:
                lines.append(f"| {noise:g} | {m} | failed or not run |" + " |" * 12)
                continue
            rsum = f"{c['rsum']:.1f}" + (f" ± {c['rsum_sd']:.1f}" if c["rsum_sd"] is not None else "")
            lines.append("| " + " | ".join([
                f"{noise:g}", m, str(c["seeds"]), *(f"{c[k]:.1f}" for k in recalls), rsum,
                f"{100 * c['rsum'] / ref['rsum']:.1f}" if ref else "",
                f"{c['auc']:.3f}" if c["auc"] is not None else "-", f"{c['s_per_epoch']:.1f}",
                f"{c['s_per_epoch'] / base['s_per_epoch']:.2f}" if base else "",
                f"{c['peak_gib']:.2f}"]) + " |")
    return "\n".join(lines)


def input_speed(args):
    """Images/s of the training images, per-sample PIL against the cache (built first, timed), at the
    model's size."""
    if args.fake_f30k:
        embedded.write_f30k_like(args.data_root, {"train": args.fake_f30k, "dev": 10, "test": 10})
    paths = data.load_split(args.dataset, args.data_root, "train").paths
    model = (baseline.EMBEDDED if args.dataset == "embedded" else baseline.REAL)["model"]
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(size, is_train=False)
    out = {"images": len(paths), "workers": args.workers, "model": model}
    for name, folder in (("pil", None), ("cache", Path(args.out_dir) / "input-cache")):
        shutil.rmtree(Path(args.out_dir) / "input-cache", ignore_errors=True)
        t0 = time.time()
        images = data.Pixels(preprocess, folder, args.workers).images(paths)
        out["cache_build_s"] = time.time() - t0 if folder else None
        loader = torch.utils.data.DataLoader(images, 256, shuffle=True, num_workers=args.workers)
        t0, n = time.time(), 0
        for x, _ in loader:
            n += len(x)
        out[f"{name}_images_per_s"] = n / (time.time() - t0)
        print(f"{name:>5}: {out[f'{name}_images_per_s']:8.0f} images/s ({n} images of {tuple(x.shape[1:])}, "
              f"{args.workers} workers)" + (f"; built in {out['cache_build_s']:.1f} s" if folder else ""),
              flush=True)
    return out


def agreement(args):
    """Share of pairs on which NPC's look-ahead ratio r says the same (r < 1 or not) under bf16 and
    fp32 training."""
    root, device = Path(baseline.EMBEDDED["data_root"]), torch.device("cpu")
    model, preprocess, tokenizer = common.load_model("nc-tiny", embedded.prepare(root, device), device)
    pixels = data.Pixels(preprocess, root)
    train, is_noisy = data.noisy_train("embedded", root, 0.4, 0)
    flags = SimpleNamespace(batch_size=128, seed=99, bank_threshold=0.9)
    img, txt = common.features(model, train, pixels, tokenizer, device)
    owner = torch.as_tensor(train.img_of_cap)
    bank_img, bank_txt, _ = npc.memory_bank(img, txt, owner, model.logit_scale.exp().item(), is_noisy, flags)
    pairs = npc.WithMemory(data.Pairs(train, pixels, tokenizer), bank_img, bank_txt)
    loader = torch.utils.data.DataLoader(pairs, 128, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)[:8]
    out = {}
    for lr in (1e-5, 5e-4):
        r = {}
        for mode in ("fp32", "bf16", "bf16 memory"):
            amp = torch.autocast("cpu", torch.bfloat16, enabled=mode != "fp32")
            losses = bf16_memory_losses if mode == "bf16 memory" else npc.memory_losses
            r[mode] = []
            for images, tokens, _, images_I, tokens_I, _, images_T, tokens_T, _ in batches:
                memory = (pixels.normalize(torch.cat([images_I, images_T])),
                          torch.cat([tokens_I, tokens_T]))  # (2B, ...)
                siamese = copy.deepcopy(model)
                opt = runs.optimizer(siamese, lr, 0.2)
                l_I, l_T = losses(model, *memory)
                with amp:
                    loss = common.info_nce(*siamese(pixels.normalize(images), tokens)).mean()
                runs.train_step(siamese, opt, loss)
                l_I_after, l_T_after = losses(siamese, *memory)
                r[mode].append((l_I / l_I_after + l_T / l_T_after) / 2)
            r[mode] = torch.cat(r[mode]).numpy()
        out[f"lr {lr:g}"] = {"r_mean": float(r["fp32"].mean()), "r_sd": float(r["fp32"].std()),
                             "agree_fp32_memory": float(np.mean((r["bf16"] < 1) == (r["fp32"] < 1))),
                             "agree_bf16_memory": float(np.mean((r["bf16 memory"] < 1) == (r["fp32"] < 1)))}
        row = out[f"lr {lr:g}"]
        print(f"lr {lr:g}: r (fp32) mean {r['fp32'].mean():.4f} sd {r['fp32'].std():.4f}; bf16 training "
              f"agrees with fp32 about w < 1 on {row['agree_fp32_memory']:.1%} of {len(r['fp32'])} pairs "
              f"with fp32 memory losses, {row['agree_bf16_memory']:.1%} with bf16 memory losses", flush=True)
    return out


def bf16_memory_losses(model, images, tokens):
    """The memory losses as npc.py and sdd.py computed them before: under bf16 autocast (fp32 out)."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        img, txt, scale = model(images, tokens)
        return tuple(common.info_nce(a, b, scale).float() for a, b in zip(img.chunk(2), txt.chunk(2)))


def check_flags(args):
    """One line for a flag that would do nothing, or a value given twice, before any work."""
    for flag in ("fake_f30k", "workers"):
        if getattr(args, flag) is not None and not args.input:
            raise data.UserError(f"--{flag.replace('_', '-')} is for --input only")
    args.workers = 2 if args.workers is None else args.workers
    for flag in ("methods", "noise", "seeds"):
        values = getattr(args, flag) or []
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise data.UserError(f"--{flag} lists {', '.join(map(str, repeated))} more than once: a repeated "
                                 "value would count twice in the means")


def main():
    args = p.parse_args()
    check_flags(args)
    if args.input or args.agreement:
        args.out_dir = args.out_dir or "out/bench-precision-input"
        if args.input and args.data_root is None:
            raise data.UserError("--input needs --data-root "
                                 "(with --fake-f30k N, a folder to write generated JPEGs to)")
        result = input_speed(args) if args.input else agreement(args)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        name = "input.json" if args.input else "agreement.json"
        data.atomic_write(Path(args.out_dir) / name, lambda f: f.write(json.dumps(result, indent=1).encode()))
        return
    noises = args.noise or ([0.4] if args.quick else [0.0, 0.2, 0.4, 0.6, 0.8])
    if not all(0 <= n < 1 for n in noises):
        raise data.UserError(f"--noise must be in [0, 1), got {noises}")
    if args.nproc < 1:
        raise data.UserError(f"--nproc must be at least 1, got {args.nproc}")
    args.out_dir = args.out_dir or f"out/bench-{'quick' if args.quick else args.dataset}"
    defaults = dict(baseline.EMBEDDED if args.dataset == "embedded" else baseline.REAL)  # the shared budget
    if args.dataset == "embedded":
        args.data_root = args.data_root or (f"{args.out_dir}/data" if args.quick else defaults["data_root"])
        if args.quick:  # a small dataset and a briefly pre-trained tiny CLIP (as the tests use)
            embedded.ensure_embedded(args.data_root, QUICK["sizes"])
            embedded.pretrain_tiny(args.data_root, torch.device("cpu"), steps=150, batch_size=64, warmup=15)
        defaults["pretrained"] = embedded.prepare(args.data_root, torch.device("cpu"))
    elif args.data_root is None:
        raise data.UserError(f"--data-root is required for --dataset {args.dataset}")
    # what every run shares
    budget = {k: defaults[k] for k in ("model", "pretrained", "epochs", "batch_size", "lr", "warmup")}
    budget.update({k: QUICK[k] for k in ("epochs", "batch_size", "warmup")} if args.quick else {})
    given = (("epochs", args.epochs), ("batch_size", args.batch_size))
    budget.update({k: v for k, v in given if v is not None})
    methods = [m for m in METHODS if m in args.methods]  # clean first: the reference
    print(f"bench: {methods} x noise {noises} x seeds {args.seeds}, budget {budget}, out {args.out_dir}",
          flush=True)

    cells = {}  # (method, noise) -> the finished runs of its seeds
    for noise in noises:
        for seed in args.seeds:
            for m in methods:
                if not (m == "clean" and noise == 0):
                    cells.setdefault((m, noise), []).append(run(m, noise, seed, args, budget))
    failed = sum(r is None for runs_ in cells.values() for r in runs_)
    cells = {key: [dict(r, method=key[0]) for r in runs_ if r] for key, runs_ in cells.items()}
    md = table(cells, methods, noises)
    print(md)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    data.atomic_write(Path(args.out_dir) / "table.md", lambda f: f.write((md + "\n").encode()))
    done = [dict(r, noise=n) for (m, n), runs_ in cells.items() for r in runs_]
    rows = {f"{m} {n:g}": summary(runs_) for (m, n), runs_ in cells.items() if runs_}
    report = {"budget": budget, "seeds": args.seeds, "rows": rows, "runs": done}
    data.atomic_write(Path(args.out_dir) / "bench.json",
                      lambda f: f.write(json.dumps(report, indent=1).encode()))
    if failed:
        raise data.UserError(f"{failed} runs failed; their logs are under {args.out_dir}")


if __name__ == "__main__":
    runs.run(main)
