"""One training run of a script: the shared flags and their dataset defaults, the checks made before any work, the
rules of the output folder, the per-epoch checkpoints, and the final test with results.json. Definitions only.

The output folder's rules: a fresh run refuses a folder that already holds a run (a checkpoint or results.json),
unless --overwrite, which deletes that run's files first. --resume continues the run in the folder only when every
flag that changes what it computes is the one it was started with; a resume of a finished run says so and exits 0,
rewriting nothing.
"""
import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import common
import data
from data import UserError

# ---- The defaults that depend on the dataset. Each script declares its flags at its top.
EMBEDDED = {"data_root": "data/embedded", "model": "nc-tiny", "pretrained": None, "epochs": 3, "batch_size": 128, "lr": 5e-4,
            "warmup": 50, "workers": 0, "noise": 0.4}
REAL = {"model": "ViT-B-32", "pretrained": "openai", "epochs": 5, "batch_size": 256, "lr": 1e-5, "warmup": 500, "workers": 8, "noise": 0.4}
# flags that change how a run goes but not what it computes: a resume may change them
HOW = ("resume", "overwrite", "out_dir", "device", "workers", "no_image_cache", "compile", "plot")
RUN_FILES = ("last.pt", "best.pt", "results.json")  # a folder holding one of these holds a run
WRITTEN = (*RUN_FILES, "log.txt", "similarity_epoch*.png", "*.tmp")  # everything a script writes in its folder


class Parser(argparse.ArgumentParser):  # the dataset defaults in -h; errors in one line, like all bad input
    def __init__(self, doc, embedded=None, real=None):  # embedded, real: a script's own changes to the defaults
        self.defaults = {"embedded": dict(EMBEDDED, **(embedded or {})), "real": dict(REAL, **(real or {}))}
        super().__init__(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                         epilog=f"embedded defaults: {self.defaults['embedded']}\nreal-data defaults: {self.defaults['real']} (cc120k: noise 0)")

    def error(self, message):
        self.exit(2, f"error: {message} (see -h)\n")


def parse(p, script):
    """Parse the flags, fill the defaults of the chosen dataset (None in the parser), check them and the output
    folder before any work. Exits 0 on the resume of a finished run."""
    args = p.parse_args()
    kind = "embedded" if args.dataset == "embedded" else "real"
    defaults = dict(p.defaults[kind], **({"noise": 0.0} if args.dataset == "cc120k" else {}))
    defaults["workers"] = min(defaults["workers"], len(os.sched_getaffinity(0)))  # no more workers than cores
    applied = {k: v for k, v in defaults.items() if getattr(args, k) is None}
    for k, v in applied.items():
        setattr(args, k, v)
    if args.data_root is None and args.dataset != "embedded":
        raise UserError(f"--data-root is required for --dataset {args.dataset}")
    check_flags(args)
    args.device = common.check_device(args.device)
    # the autocast of the training forwards: bf16 on CUDA, none on the CPU, unless --precision says
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.out_dir = args.out_dir or f"out/{script}-{args.dataset}-n{args.noise:g}"
    check_out_dir(Path(args.out_dir))
    if args.resume:
        check_resume(args, script)
    else:
        start_fresh(args)
    if os.environ.get("RANK", "0") == "0":  # which defaults apply, and why (the full flags go to log.txt)
        setting = "embedded" if kind == "embedded" else "real-data"
        print(f"defaults of the {setting} setting, which --dataset {args.dataset} picks (not --model): {applied}")
    return args


def check_flags(args):
    """One line for each shared flag out of its range (exit 2), before any work."""
    if not 0 <= args.noise < 1:
        raise UserError(f"--noise must be in [0, 1), got {args.noise}")
    if args.batch_size < 2:
        raise UserError(f"--batch-size must be 2 or more (a batch of 1 has no negatives and trains nothing), "
                        f"got {args.batch_size}")
    if args.epochs < 1:
        raise UserError(f"--epochs must be 1 or more, got {args.epochs}")
    for flag in ("lr", "warmup", "wd", "workers", "seed", "noise_seed"):
        value = getattr(args, flag)
        if not 0 <= value < float("inf"):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite deletes it: give one of them")


def check_out_dir(out):
    """The output folder must be a folder, or creatable, and writable."""
    parent = next(p for p in (out, *out.parents) if p.exists())  # the nearest part of the path that exists
    if not parent.is_dir():
        raise UserError(f"--out-dir {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out}: {parent} is not writable")


def check_resume(args, script):
    """--resume: the checkpoint must be this script's, of a run with the same flags; a finished run exits 0."""
    ck = common.load_checkpoint(Path(args.out_dir) / "last.pt", mmap=True)
    saved = ck.get("args", {})
    if ck.get("method") != script:
        raise UserError(f"{args.out_dir}/last.pt is a {ck.get('method')} checkpoint, not {script}: "
                        "resume it with its own script")
    for k, v in vars(args).items():
        if k not in HOW and saved.get(k) != v:
            flag = "--" + k.replace("_", "-")
            raise UserError(f"--resume: {flag} is {v} but the run in {args.out_dir} has {saved.get(k)}: "
                            "resume with its value, or start a new run in another --out-dir")
    if ck["epoch"] + 1 >= args.epochs and (Path(args.out_dir) / "results.json").is_file():
        if os.environ.get("RANK", "0") == "0":
            print(f"{args.out_dir} holds a finished run ({args.epochs} epochs, results.json): nothing to resume")
        sys.exit(0)


def start_fresh(args):
    """A fresh run refuses a folder holding a run; with --overwrite it deletes that run's files first. The files of
    a run that stopped before its first checkpoint (its log) are deleted without asking: they hold no result."""
    out = Path(args.out_dir)
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found and not args.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(found)}): --resume to continue it, "
                        "--overwrite to delete it and start again, or another --out-dir")
    for f in [f for pattern in WRITTEN for f in out.glob(pattern)]:
        f.unlink(missing_ok=True)  # every process may delete; all finish before the process group forms


def run(main):
    """Call main(); a UserError (also one raised in a DataLoader worker) becomes one line and exit status 2."""
    try:
        main()
    except UserError as e:
        line = [s for s in str(e).splitlines() if s.strip()][-1].strip()
        print(f"error: {line.split('UserError: ')[-1]}", file=sys.stderr)
        sys.exit(2)


def logger(out_dir):
    """log(line): print on rank 0 and append the same line to out_dir/log.txt."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def log(line):
        if common.rank() == 0:
            print(line, flush=True)
            with open(Path(out_dir) / "log.txt", "a") as f:
                f.write(line + "\n")
    return log


# ---- Checkpoints of the epochs, and the final test
def resume(args, model, opt):
    """Restore model and optimiser from out_dir/last.pt (checked by parse) -> (next epoch, best dev rSum, history)."""
    ck = common.load_checkpoint(Path(args.out_dir) / "last.pt")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return ck["epoch"] + 1, ck["best"], ck["history"]


def save_epoch(args, method, model, opt, epoch, best, history, extra=None):
    """last.pt every epoch (with the optimiser), best.pt when the dev rSum of history[-1] beats best. -> new best."""
    dev = history[-1]["dev"]["rsum"]
    ck = dict(method=method, args=vars(args), model=model.state_dict(), epoch=epoch, best=max(best, dev), history=history,
              **(extra or {}))
    if common.rank() == 0:
        if dev > best:
            common.save_checkpoint(Path(args.out_dir) / "best.pt", ck)
        common.save_checkpoint(Path(args.out_dir) / "last.pt", dict(ck, optimizer=opt.state_dict()))
    return max(best, dev)


def finish(args, method, model, test, pixels, tokenizer, device, log, history, extra=None):
    """Test the best-dev checkpoint, log it, write out_dir/results.json (whole). -> test recalls."""
    if common.world() > 1:
        dist.barrier()  # rank 0 has written best.pt
    ck = common.load_checkpoint(Path(args.out_dir) / "best.pt")
    model.load_state_dict(ck["model"])
    r = common.evaluate(model, test, pixels, tokenizer, device, coco_1k=args.dataset == "coco")
    log(f"test (best dev epoch {ck['epoch'] + 1}): {common.fmt(r)}")
    if "coco1k" in r:
        log(f"test {common.fmt_1k(r['coco1k'], len(test.paths))}")
    start = history[0]["dev"]["rsum"] if history[0]["epoch"] == 0 else None
    if start is not None and ck["best"] <= start:
        log(f"no training epoch beat the starting model's dev rSum ({start:.1f}; best epoch {ck['best']:.1f})")
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = dict(method=method, args=vars(args), best_epoch=ck["epoch"] + 1, test=r, history=history,
                   peak_memory_gib=peak / 2**30, **(extra or {}))  # CUDA: tensors allocated; CPU: the process's peak RSS
    if common.rank() == 0:
        data.atomic_write(Path(args.out_dir) / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    return r
