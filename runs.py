"""One training run of a script: the parser of its flags (each script gives its own defaults), the checks made
before any work, the rules of the output folder, the training pieces (batches, AdamW, the schedule, a step),
the per-epoch checkpoints, and the final test with results.json. Definitions only.

The output folder's rules: one run at a time uses it (a lock file, .lock). A fresh run refuses a folder that
already holds a run (a checkpoint or results.json), unless --overwrite, which sets that run's files aside and
deletes them only once the new run has saved its first epoch: a new run that fails before, on a bad flag, a
missing file or a diverged step, puts the old one back. --resume continues the run in the folder only when
every flag that changes what it computes is the one it was started with; a resume of a finished run says so
and exits 0, rewriting nothing.
"""
import argparse
import atexit
import json
import math
import os
import resource
import shutil
import socket
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist

import common
import data
from data import UserError

# flags that change how a run goes but not what it computes: a resume may change them
HOW = ("resume", "overwrite", "out_dir", "device", "workers", "no_image_cache", "compile", "plot")
RUN_FILES = ("last.pt", "best.pt", "results.json")  # a folder holding one of these holds a run
WRITTEN = (*RUN_FILES, "log.txt", "similarity_epoch*.png", "*.tmp")  # all a script writes in its folder
LOCK = ".lock"  # "pid host" of the run using the folder
SET_ASIDE = ".overwritten"  # the run --overwrite replaces, kept until the new run has saved an epoch
held = []  # the lock this process holds


class OneLineParser(argparse.ArgumentParser):
    """argparse with every error in one line (exit 2), like all bad input; for eval.py and bench.py."""

    def __init__(self, doc, epilog=None):
        super().__init__(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False, epilog=epilog)

    def error(self, message):
        self.exit(2, f"error: {message} (see -h)\n")


class Parser(OneLineParser):
    """A training script's flags. embedded, real: the script's defaults in the two settings; --dataset
    embedded picks the first, any other dataset the second. -h shows both beside each flag. parse_args()
    fills in the setting's value of every flag not given, and checks the shared flags (one line, exit 2)."""

    def __init__(self, doc, embedded, real):
        self.settings = {"embedded": embedded, "real": real}
        super().__init__(doc, epilog="cc120k has no added noise by default (--noise 0).")

    def add_argument(self, *names, help="", **kwargs):
        """Each flag's help ends with its default: the two settings' values where the script gives them."""
        dest = names[0].lstrip("-").replace("-", "_")
        if dest in self.settings["embedded"]:  # its default is None: parse_args fills in the setting's value
            embedded, real = self.settings["embedded"][dest], self.settings["real"][dest]
            help += f" (embedded: {embedded}; real data: {real})"
        elif kwargs.get("default") is not None and "action" not in kwargs:  # not -h, not a switch
            help += f" (default: {kwargs['default']})"
        return super().add_argument(*names, help=help, **kwargs)

    def parse_args(self, argv=None, namespace=None):
        """The flags, with the defaults of the setting --dataset picks, checked before any work."""
        args = super().parse_args(argv, namespace)
        setting = "embedded" if args.dataset == "embedded" else "real"
        defaults = dict(self.settings[setting])
        if args.dataset == "cc120k":
            defaults["noise"] = 0.0  # its captions are noisy already
        defaults["workers"] = min(defaults["workers"], len(os.sched_getaffinity(0)))  # at most the cores
        taken = {k: v for k, v in defaults.items() if getattr(args, k) is None}
        for k, v in taken.items():
            setattr(args, k, v)
        if args.data_root is None and args.dataset != "embedded":
            raise UserError(f"--data-root is required for --dataset {args.dataset}")
        check_flags(args)
        args.device = common.check_device(args.device)
        # the autocast of the training forwards: bf16 on CUDA, none on the CPU, unless --precision says
        args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
        if os.environ.get("RANK", "0") == "0":  # which defaults apply, and why (all the flags go to log.txt)
            name = "embedded" if setting == "embedded" else "real-data"
            line = f"defaults of the {name} setting, which --dataset {args.dataset} picks (not --model): "
            line += str(taken)
            print("\n".join(textwrap.wrap(line, 120, subsequent_indent="  ")))
        return args


def check_flags(args):
    """One line for each shared flag out of its range (exit 2), before any work."""
    if not 0 <= args.noise < 1:
        raise UserError(f"--noise must be in [0, 1), got {args.noise}")
    if args.batch_size < 2:
        raise UserError("--batch-size must be 2 or more (a batch of 1 has no negatives and trains nothing), "
                        f"got {args.batch_size}")
    if args.epochs < 1:
        raise UserError(f"--epochs must be 1 or more, got {args.epochs}")
    for flag in ("lr", "warmup", "wd", "workers", "seed", "noise_seed"):
        value = getattr(args, flag)
        if not 0 <= value < float("inf"):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    for flag in ("seed", "noise_seed"):  # numpy's generators take seeds below 2**32
        if getattr(args, flag) > 2**32 - 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at most 2**32 - 1 = {2**32 - 1}, "
                            f"got {getattr(args, flag)}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; each process takes batch / processes
    if args.batch_size % processes:
        raise UserError(f"--batch-size {args.batch_size} does not split evenly over {processes} processes: "
                        f"give a multiple of {processes}")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite deletes it: give one of "
                        "them")


def claim_out_dir(args, method):
    """The run's folder (default out/<method>-<dataset>-n<noise>): checked, then either resumed (--resume: the
    run there must have the same flags; a finished one exits 0) or started afresh (a folder holding a run
    refuses, unless --overwrite)."""
    args.out_dir = args.out_dir or f"out/{method}-{args.dataset}-n{args.noise:g}"
    check_out_dir(Path(args.out_dir))
    lock(Path(args.out_dir))
    if args.resume:
        check_resume(args, method)
    else:
        start_fresh(args)


def check_out_dir(out):
    """The output folder must be a folder, or creatable, and writable."""
    parent = next(p for p in (out, *out.parents) if p.exists())  # the nearest part of the path that exists
    if not parent.is_dir():
        raise UserError(f"--out-dir {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out}: {parent} is not writable")


def check_resume(args, method):
    """--resume: the checkpoint must be this method's, of a run with the same flags; a finished run exits."""
    ck = common.load_checkpoint(Path(args.out_dir) / "last.pt", mmap=True)
    saved = ck.get("args", {})
    if ck.get("method") != method:
        raise UserError(f"{args.out_dir}/last.pt is a {ck.get('method')} checkpoint, not {method}: "
                        "resume it with its own script and flags")
    for k, v in vars(args).items():
        if k not in HOW and saved.get(k) != v:
            flag = "--" + k.replace("_", "-")
            raise UserError(f"--resume: {flag} is {v} but the run in {args.out_dir} has {saved.get(k)}: "
                            "resume with its value, or start a new run in another --out-dir")
    if ck["epoch"] + 1 >= args.epochs and (Path(args.out_dir) / "results.json").is_file():
        if os.environ.get("RANK", "0") == "0":
            print(f"{args.out_dir} holds a finished run ({args.epochs} epochs, results.json): "
                  "nothing to resume")
        sys.exit(0)


def lock(out):
    """Take the folder for this run: a lock file created atomically and removed at exit. A lock held by a live
    process refuses; one left by a process that is gone (killed, on this host) is taken over. Under torchrun
    rank 0 holds it for the job."""
    if os.environ.get("RANK", "0") != "0":
        return
    out.mkdir(parents=True, exist_ok=True)
    me = f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(out / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = (out / LOCK).read_text().split() or ["0", "(starting)"]
            if holder[1] != socket.gethostname() or alive(int(holder[0])):
                raise UserError(f"{out} is in use by process {holder[0]} on {holder[1]}: wait for that run "
                                f"or use another --out-dir (if none uses it, delete {out / LOCK})") from None
            print(f"{out}: taking over the lock of process {holder[0]}, which is no longer running")
            (out / LOCK).unlink(missing_ok=True)
    os.write(fd, me.encode())
    os.close(fd)
    held.append((out / LOCK, me))
    atexit.register(release)
    put_back(out)  # left by an --overwrite run that was killed before its first checkpoint


def alive(pid):
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def release():
    """Give back the folder's lock and, if this run saved no epoch, put back the run it was to overwrite."""
    while held:
        path, me = held.pop()
        put_back(path.parent)
        if path.is_file() and path.read_text() == me:
            path.unlink()


def put_back(out):
    """The run that --overwrite set aside, back in its folder, in place of what the new run wrote."""
    aside = out / SET_ASIDE
    if not aside.is_dir():
        return
    for f in [f for pattern in WRITTEN for f in out.glob(pattern)]:
        f.unlink(missing_ok=True)
    for f in aside.iterdir():
        os.replace(f, out / f.name)
    aside.rmdir()


def start_fresh(args):
    """A fresh run refuses a folder holding a run. With --overwrite it sets that run's files aside, to be
    deleted once this run has saved its first epoch (release() puts them back if it fails before). The files
    of a run that stopped before its first checkpoint (its log) are deleted without asking: they hold no
    result. Under torchrun rank 0 moves the files."""
    out = Path(args.out_dir)
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found and not args.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(found)}): --resume to continue it, "
                        "--overwrite to delete it and start again, or another --out-dir")
    if os.environ.get("RANK", "0") != "0":
        return
    old = [f for pattern in WRITTEN for f in out.glob(pattern)]
    if found:
        (out / SET_ASIDE).mkdir(exist_ok=True)
    for f in old:
        if found:
            os.replace(f, out / SET_ASIDE / f.name)
        else:
            f.unlink(missing_ok=True)


def run(main):
    """Call main(); a UserError (also one raised in a DataLoader worker) becomes one line and exit 2."""
    try:
        main()
    except UserError as e:
        line = [s for s in str(e).splitlines() if s.strip()][-1].strip()
        print(f"error: {line.split('UserError: ')[-1]}", file=sys.stderr)
        sys.exit(2)
    finally:
        release()


def logger(out_dir):
    """log(line): print on rank 0 and append the same line to out_dir/log.txt."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def log(line):
        if common.rank() == 0:
            print(line, flush=True)
            with open(Path(out_dir) / "log.txt", "a") as f:
                f.write(line + "\n")
    return log


def log_flags(log, method, args):
    """All the run's flags, in lines of 120 characters at most."""
    for line in textwrap.wrap(f"{method}: {vars(args)}", 120, subsequent_indent="  "):
        log(line)


# ---- Training pieces: the batches, AdamW, the schedule, one step
def loader(ds, batch_size, workers, seed):
    """Shuffled batches of batch_size / W pairs in each of W processes, ordered by (seed, epoch) only."""
    sampler = torch.utils.data.DistributedSampler(ds, common.world(), common.rank(), shuffle=True, seed=seed,
                                                  drop_last=True)
    return torch.utils.data.DataLoader(ds, batch_size // common.world(), sampler=sampler, num_workers=workers,
                                       drop_last=True, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0)


def optimizer(model, lr, wd):
    """AdamW, official betas and eps; no weight decay on gains, biases or logit_scale, as open_clip's training
    code (src/open_clip_train/legacy_main.py:332 at 89fb801); the official NPC, SDD and OSA AdamW decay every
    parameter (NPC main_CLIP.py:85)."""
    groups = {True: [], False: []}
    for n, p in model.named_parameters():
        groups[p.ndim >= 2 and "logit_scale" not in n].append(p)
    params = [{"params": groups[True], "weight_decay": wd}, {"params": groups[False], "weight_decay": 0.0}]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def set_lr(opt, step, total, warmup, peak):
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at step `total`. Sets and returns the lr."""
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        lr = 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def train_step(model, opt, loss, clip=10.0):
    """Backward, clip the gradient norm at 10 (as NPC main_NPC.py:190 and SDD main_SDD_sim.py:239; NPC's
    main_CLIP.py does not clip), step, clamp the logit scale to ln(100) as open_clip's training code
    (legacy_train.py:200; no official NPC/SDD/OSA code clamps it). A loss that is not finite stops the run in
    one line, before it reaches the weights or a checkpoint."""
    if not torch.isfinite(loss):
        step = int(next(iter(opt.state.values()), {}).get("step", 0)) + 1
        lr = opt.param_groups[0]["lr"]
        raise UserError(f"the loss is {loss.item()} at optimiser step {step} (lr {lr:g}): the run "
                        "diverged and stopped; the checkpoints of its finished epochs are kept")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    with torch.no_grad():
        getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))


# ---- Checkpoints of the epochs, and the final test
def resume(args, model, opt):
    """Restore model and optimiser from out_dir/last.pt (checked by claim_out_dir). -> next epoch, history"""
    ck = common.load_checkpoint(Path(args.out_dir) / "last.pt")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return ck["epoch"] + 1, ck["history"]


def save_epoch(args, method, model, opt, history, extra=None):
    """After the epoch history[-1]: last.pt (with the optimiser), and best.pt when its dev rSum beats every
    earlier training epoch's (the starting model, epoch 0, does not compete: best.pt holds a trained
    model)."""
    dev = [h["dev"]["rsum"] for h in history if h["epoch"] > 0]  # the training epochs' dev rSum, this last
    ck = dict(method=method, args=vars(args), model=model.state_dict(), epoch=history[-1]["epoch"] - 1,
              best=max(dev), history=history, **(extra or {}))
    if common.rank() == 0:
        if dev[-1] > max(dev[:-1], default=-1.0):
            common.save_checkpoint(Path(args.out_dir) / "best.pt", ck)
        common.save_checkpoint(Path(args.out_dir) / "last.pt", dict(ck, optimizer=opt.state_dict()))
        shutil.rmtree(Path(args.out_dir) / SET_ASIDE, ignore_errors=True)  # the run --overwrite replaced


def finish(args, method, model, evaluate, test, history, extra=None):
    """Test the best-dev checkpoint with evaluate(model, test), log it, and write out_dir/results.json (every
    figure of the run, and extra). -> the test recalls."""
    log = logger(args.out_dir)
    if common.world() > 1:
        dist.barrier()  # rank 0 has written best.pt
    ck = common.load_checkpoint(Path(args.out_dir) / "best.pt")
    model.load_state_dict(ck["model"])
    r = evaluate(model, test, coco_1k=args.dataset == "coco")
    log(f"test (best dev epoch {ck['epoch'] + 1}): {common.fmt(r)}")
    if "coco1k" in r:
        log(f"test {common.fmt_1k(r['coco1k'], len(test.paths))}")
    start = history[0]["dev"]["rsum"] if history[0]["epoch"] == 0 else None
    if start is not None and ck["best"] <= start:
        log(f"no training epoch beat the starting model's dev rSum ({start:.1f}; best epoch "
            f"{ck['best']:.1f})")
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()  # the tensors allocated
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak resident memory
    results = dict(method=method, args=vars(args), best_epoch=ck["epoch"] + 1, test=r, history=history,
                   peak_memory_gib=peak / 2**30, **(extra or {}))
    if common.rank() == 0:
        text = json.dumps(results, indent=1).encode()
        data.atomic_write(Path(args.out_dir) / "results.json", lambda f: f.write(text))
    return r
