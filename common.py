"""Shared pieces of every script: flags, setup and DDP, CLIP loading, per-sample InfoNCE, GMM, retrieval
evaluation, checkpoints. Definitions only: importing this file runs nothing but registering nc-tiny."""
import argparse
import json
import logging
import math
import os
import random
import resource
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

import data
from data import UserError

warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated")  # its successor is private

# ---- Flags: the defaults that depend on the dataset. Each script declares its flags at its top.
EMBEDDED = {"data_root": "data/embedded", "model": "nc-tiny", "pretrained": None, "epochs": 3, "batch_size": 128, "lr": 5e-4,
            "warmup": 50, "workers": 0, "noise": 0.4}
REAL = {"model": "ViT-B-32", "pretrained": "openai", "epochs": 5, "batch_size": 256, "lr": 1e-5, "warmup": 500, "workers": 8, "noise": 0.4}


class Parser(argparse.ArgumentParser):  # the dataset defaults in -h; errors in one line, like all bad input
    def __init__(self, doc, embedded=None, real=None):  # embedded, real: a script's own changes to the defaults
        self.defaults = {"embedded": dict(EMBEDDED, **(embedded or {})), "real": dict(REAL, **(real or {}))}
        super().__init__(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                         epilog=f"embedded defaults: {self.defaults['embedded']}\nreal-data defaults: {self.defaults['real']} (cc120k: noise 0)")

    def error(self, message):
        self.exit(2, f"error: {message} (see -h)\n")


def parse(p, script):
    """Parse the flags, fill the defaults of the chosen dataset (None in the parser), check them."""
    args = p.parse_args()
    defaults = dict(p.defaults["embedded" if args.dataset == "embedded" else "real"], **({"noise": 0.0} if args.dataset == "cc120k" else {}))
    for k, v in defaults.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.data_root is None and args.dataset != "embedded":
        raise UserError(f"--data-root is required for --dataset {args.dataset}")
    if not 0 <= args.noise < 1:
        raise UserError(f"--noise must be in [0, 1), got {args.noise}")
    args.out_dir = args.out_dir or f"out/{script}-{args.dataset}-n{args.noise:g}"
    if args.resume:  # refuse another method's or model's checkpoint before any work
        ck = load_checkpoint(Path(args.out_dir) / "last.pt", mmap=True)
        if (ck.get("method"), ck.get("args", {}).get("model")) != (script, args.model):
            raise UserError(f"{args.out_dir}/last.pt is not a {script} checkpoint of {args.model}")
    return args


def run(main):
    """Call main(); a UserError (also one raised in a DataLoader worker) becomes one line and exit status 2."""
    try:
        main()
    except UserError as e:
        line = [s for s in str(e).splitlines() if s.strip()][-1].strip()
        print(f"error: {line.split('UserError: ')[-1]}", file=sys.stderr)
        sys.exit(2)


# ---- Setup, DDP (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE), logging
def setup(args):
    """Join the process group under torchrun, pick the device, seed everything. Returns the device."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)  # NCCL collectives (barrier, all_reduce) run on the current device
    args.precision = getattr(args, "precision", None) or ("bf16" if device.startswith("cuda") else "fp32")  # autocast
    torch.backends.cudnn.allow_tf32 = False  # fp32 passes (memory losses, features) stay fp32 in the convolution too
    start_epoch(None, args, -1)
    return torch.device(device)


def start_epoch(loader, args, epoch):
    """The epoch's batch order and every random generator depend on (seed, rank, epoch) only: --resume is exact."""
    if loader is not None:
        loader.sampler.set_epoch(epoch)
    for seed_fn in (random.seed, np.random.seed, torch.manual_seed):
        seed_fn(args.seed + rank() + 1000 * (epoch + 1))


def global_mean(xs):
    """The mean of an epoch's per-step values over every process (all take the same number of steps)."""
    if world() == 1:
        return float(np.mean(xs))
    m = torch.tensor(float(np.mean(xs)), dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(m)
    return m.item() / world()


def rank():  # this process's index under torchrun, else 0
    return dist.get_rank() if dist.is_initialized() else 0


def world():  # the number of processes
    return dist.get_world_size() if dist.is_initialized() else 1


def gather(x):
    """Concatenate x (B, ...) of all processes -> (W*B, ...), the gradient flowing through every part."""
    return torch.cat(torch.distributed.nn.functional.all_gather(x)) if world() > 1 else x


def logger(out_dir):
    """log(line): print on rank 0 and append the same line to out_dir/log.txt."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    def log(line):
        if rank() == 0:
            print(line, flush=True)
            with open(Path(out_dir) / "log.txt", "a") as f:
                f.write(line + "\n")
    return log


# ---- Models. nc-tiny: embed 128; 64 px ViT, patch 16, width 128, 3 layers; text width 128, 3 layers, context 32.
open_clip.factory._MODEL_CONFIGS["nc-tiny"] = {  # what add_model_config would read from a JSON file
    "embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}


def resolve_weights(model, pretrained):
    """(weights file or None, open_clip kwargs the tag implies). Fails fast, in one line, when offline."""
    if pretrained in (None, "", "none") or os.path.isfile(pretrained):
        return pretrained if pretrained not in ("", "none") else None, {}
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(f"--pretrained {pretrained} is neither a file nor a tag of {model} (tags: {tags})")
    kwargs = {"force_quick_gelu": cfg.get("quick_gelu", False), "image_mean": cfg.get("mean"), "image_std": cfg.get("std"),
              "image_interpolation": cfg.get("interpolation"), "image_resize_mode": cfg.get("resize_mode")}
    from huggingface_hub import try_to_load_from_cache
    repo, name = os.path.split(cfg.get("hf_hub", ""))
    for hit in [try_to_load_from_cache(repo, f) for f in ("open_clip_model.safetensors", name or "open_clip_pytorch_model.bin")] if repo else []:
        if isinstance(hit, str):
            return hit, kwargs
    host = "huggingface.co" if repo else cfg["url"].split("/")[2]
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(f"weights {model}/{pretrained} are not cached and {host} is unreachable: where there is internet run "
                        f"python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{pretrained}')\", "
                        "copy ~/.cache/huggingface here, or pass --pretrained /path/to/weights") from None
    return open_clip.download_pretrained(cfg), kwargs


def load_model(model_name, pretrained, device, log=print):
    """(model, preprocess, tokenizer): an open_clip model with weights from a tag, a file, or none (random init)."""
    path, kwargs = resolve_weights(model_name, pretrained)
    logging.disable(logging.WARNING)  # open_clip warns of a random init, which the line below states
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=path, device=device, **kwargs)
    except Exception as e:  # noqa: BLE001 (not weights, or weights of another model: the same to the user)
        raise UserError(f"cannot create {model_name} from {path} ({e.__class__.__name__}: {str(e).splitlines()[0][:300]})") from None
    finally:
        logging.disable(logging.NOTSET)
    log(f"model {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), weights: {path or 'random init'}")
    return model, preprocess, open_clip.get_tokenizer(model_name)


# ---- Training pieces
def optimizer(model, lr, wd):
    """AdamW, official betas and eps; no weight decay on gains, biases or logit_scale (as open_clip)."""
    groups = {True: [], False: []}
    for n, p in model.named_parameters():
        groups[p.ndim >= 2 and "logit_scale" not in n].append(p)
    return torch.optim.AdamW([{"params": groups[True], "weight_decay": wd}, {"params": groups[False], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def set_lr(opt, step, total, warmup, peak):
    """Linear warm-up for `warmup` optimiser steps, then cosine decay to 0 at step `total`. Sets and returns the lr."""
    lr = peak * (step + 1) / warmup if step < warmup else 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def train_step(model, opt, loss, clip=10.0):
    """Backward, clip the gradient norm (official: 10), step, clamp the logit scale to ln(100). A loss that is not
    finite stops the run in one line, before it reaches the weights or a checkpoint."""
    if not torch.isfinite(loss):
        step = int(next(iter(opt.state.values()), {}).get("step", 0)) + 1
        raise UserError(f"the loss is {loss.item()} at optimiser step {step} (lr {opt.param_groups[0]['lr']:g}): the run "
                        "diverged and stopped; the checkpoints of its finished epochs are kept")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    with torch.no_grad():
        getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))


def info_nce(img, txt, scale, local=False):
    """Per-sample symmetric InfoNCE, l_i = (CE_i2t(i) + CE_t2i(i)) / 2: img, txt (B, D) normalised -> (B,). Under DDP
    the negatives are the global batch, gathered with gradient (row i's positive: column rank*B + i), unless local."""
    all_img, all_txt, offset = (img, txt, 0) if local or world() == 1 else (gather(img), gather(txt), rank() * len(img))
    labels = torch.arange(len(img), device=img.device) + offset
    l_i2t = F.cross_entropy(scale * img @ all_txt.T, labels, reduction="none")  # (B,)
    l_t2i = F.cross_entropy(scale * txt @ all_img.T, labels, reduction="none")  # (B,)
    return (l_i2t + l_t2i) / 2


@torch.no_grad()
def pair_losses(img, txt, scale, batch_size, seed=0):
    """Per-sample InfoNCE of all pairs, img and txt (N, D), in seeded random batches -> (N,); the same in every process."""
    perm = torch.randperm(len(img), generator=torch.Generator().manual_seed(seed))
    return torch.cat([info_nce(img[b], txt[b], scale, local=True).cpu() for b in perm.split(batch_size)])[perm.argsort()]


def gmm_clean_prob(x, higher_is_clean=False, max_iter=100):
    """GMM(2) on a per-sample statistic x (N,), min-max normalised -> posterior of the clean component (N,):
    the lower-mean component for a loss, the higher-mean one for a similarity."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    gmm = GaussianMixture(2, max_iter=max_iter, tol=1e-2, reg_covar=5e-4, random_state=0).fit(x)
    return gmm.predict_proba(x)[:, gmm.means_.argmax() if higher_is_clean else gmm.means_.argmin()]


# ---- Retrieval evaluation, any number of captions per image
@torch.no_grad()
def features(model, split, pixels, tokenizer, device, batch_size=256, local=False):
    """Normalised image features (n_img, D), each image encoded once, and caption features (n_cap, D), in fp32 (bf16
    changed the top-1 of 6-10% of retrieval queries in an emulation). Under DDP (unless local) each process encodes
    every W-th image and caption, then the processes gather the whole."""
    model, r, w = getattr(model, "module", model).eval(), *((0, 1) if local else (rank(), world()))
    shard = torch.utils.data.Subset(pixels.images(split.paths), range(r, len(split.paths), w))
    caps = split.captions[r::w]
    img = [model.encode_image(pixels.normalize(x.to(device)), normalize=True)
           for x, _ in tqdm(torch.utils.data.DataLoader(shard, batch_size), "images", leave=False, disable=None)]
    txt = [model.encode_text(tokenizer(caps[i:i + batch_size]).to(device), normalize=True) for i in range(0, len(caps), batch_size)]
    return _unshard(torch.cat(img), len(split.paths), w), _unshard(torch.cat(txt), len(split.captions), w)


def chunked(fn, n, chunk):
    """fn(lo, hi) -> (hi - lo, ...) for rows lo:hi of n, called on chunks of `chunk` rows. Under DDP each process
    computes every W-th chunk and the processes gather all n rows in order (on the CPU), equal to one process's."""
    mine = [fn(lo, min(lo + chunk, n)).cpu() for lo in range(rank() * chunk, n, world() * chunk)]
    if world() == 1:
        return torch.cat(mine)
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    return torch.cat([parts[j % world()][j // world()] for j in range(-(-n // chunk))])


def _unshard(x, n, w):
    """x (about n / w, D): rows r, r + w, r + 2w ... of n, from process r -> all n rows, in order, in every process."""
    if w == 1:
        return x
    parts = [x.new_zeros(-(-n // w), x.shape[1]) for _ in range(w)]
    dist.all_gather(parts, torch.cat([x, x.new_zeros(len(parts[0]) - len(x), x.shape[1])]))
    return torch.stack(parts, 1).flatten(0, 1)[:n]  # (n / w, w, D): row j of process r is item j * w + r


def recall(sims, img_of_cap):
    """R@1/5/10 both ways and rSum from sims (n_img, n_cap). i2t: an image is a hit at K if its best-ranked own
    caption is in its top K; t2i: a caption is a hit at K if its image is in its top K. Ties favour the query."""
    owner = torch.as_tensor(img_of_cap, device=sims.device)
    pos = sims[owner, torch.arange(len(owner), device=sims.device)]  # (n_cap,) each caption with its own image
    t2i_rank = (sims > pos[None, :]).sum(0)  # (n_cap,) images scored above the caption's own
    best = torch.full((len(sims),), -math.inf, dtype=sims.dtype, device=sims.device).scatter_reduce(0, owner, pos, "amax")
    i2t_rank = (sims > best[:, None]).sum(1)  # (n_img,) captions scored above the image's best own caption
    r = {f"{d}_r{k}": 100 * (ranks < k).float().mean().item() for d, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank))
         for k in (1, 5, 10)}
    return dict(r, rsum=sum(r.values()))


def fold_recall(sims, img_of_cap, fold=1000):
    """Mean recalls over consecutive folds of `fold` images and their captions (COCO 1K: five folds), each fold's
    six recalls in full (the official NPC/SDD code adds i2t R@10 into t2i R@10 here)."""
    img_of_cap = np.asarray(img_of_cap)
    folds = [recall(sims[f * fold:(f + 1) * fold][:, img_of_cap // fold == f], img_of_cap[img_of_cap // fold == f] - f * fold)
             for f in range(len(sims) // fold)]
    return {k: float(np.mean([r[k] for r in folds])) for k in folds[0]}


def evaluate(model, split, pixels, tokenizer, device, coco_1k=False, local=False):
    """Recalls on a split; with coco_1k also the five-fold 1K means, under key 'coco1k'."""
    img, txt = features(model, split, pixels, tokenizer, device, local=local)
    sims = img @ txt.T  # (n_img, n_cap)
    return dict(recall(sims, split.img_of_cap), **({"coco1k": fold_recall(sims, split.img_of_cap)} if coco_1k else {}))


def fmt(r):
    return (f"i2t {r['i2t_r1']:5.1f} {r['i2t_r5']:5.1f} {r['i2t_r10']:5.1f}  "
            f"t2i {r['t2i_r1']:5.1f} {r['t2i_r5']:5.1f} {r['t2i_r10']:5.1f}  rsum {r['rsum']:6.1f}")


# ---- Checkpoints: written whole (temporary file, then rename), read with weights_only=True
def save_checkpoint(path, obj):
    data.atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, mmap=False):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 (any failure to unpickle means the same thing to the user)
        raise UserError(f"cannot read checkpoint {path} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None


def resume(args, model, opt):
    """Restore model and optimiser from out_dir/last.pt (checked by parse) -> (next epoch, best dev rSum, history)."""
    ck = load_checkpoint(Path(args.out_dir) / "last.pt")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return ck["epoch"] + 1, ck["best"], ck["history"]


def save_epoch(args, method, model, opt, epoch, best, history, extra=None):
    """last.pt every epoch (with the optimiser), best.pt when the dev rSum of history[-1] beats best. -> new best."""
    dev = history[-1]["dev"]["rsum"]
    ck = dict(method=method, args=vars(args), model=model.state_dict(), epoch=epoch, best=max(best, dev), history=history,
              **(extra or {}))
    if rank() == 0:
        if dev > best:
            save_checkpoint(Path(args.out_dir) / "best.pt", ck)
        save_checkpoint(Path(args.out_dir) / "last.pt", dict(ck, optimizer=opt.state_dict()))
    return max(best, dev)


def finish(args, method, model, test, pixels, tokenizer, device, log, history, extra=None):
    """Test the best-dev checkpoint, log it, write out_dir/results.json (whole). -> test recalls."""
    if world() > 1:
        dist.barrier()  # rank 0 has written best.pt
    ck = load_checkpoint(Path(args.out_dir) / "best.pt")
    model.load_state_dict(ck["model"])
    r = evaluate(model, test, pixels, tokenizer, device, coco_1k=args.dataset == "coco")
    log(f"test (best dev epoch {ck['epoch'] + 1}): {fmt(r)}")
    if "coco1k" in r:
        log(f"test COCO 1K (mean of 5 folds): {fmt(r['coco1k'])}")
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = dict(method=method, args=vars(args), best_epoch=ck["epoch"] + 1, test=r, history=history,
                   peak_memory_gib=peak / 2**30, **(extra or {}))  # CUDA: tensors allocated; CPU: the process's peak RSS
    if rank() == 0:
        data.atomic_write(Path(args.out_dir) / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    return r
