"""Shared pieces of every script: flags, setup and DDP, CLIP loading, per-sample InfoNCE, GMM, retrieval
evaluation, checkpoints. Definitions only: importing this file runs nothing.
"""
import argparse
import json
import logging
import math
import os
import random
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

import data
from data import UserError

# ---------------------------------------------------------------------------------------------------------
# Flags. Defaults that depend on the dataset are None here and filled by parse(); -h shows both sets.
EMBEDDED = dict(model="nc-tiny", pretrained=None, epochs=3, batch_size=128, lr=5e-4, warmup=50, workers=0, noise=0.4)
REAL = dict(model="ViT-B-32", pretrained="openai", epochs=5, batch_size=256, lr=1e-5, warmup=500, workers=8, noise=0.4)


def parser(doc):
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"embedded defaults: {EMBEDDED}\nreal-data defaults: {REAL} (cc120k: noise 0)")
    p.add_argument("--dataset", default="embedded", choices=data.DATASETS, help="which data (default: embedded)")
    p.add_argument("--data-root", help="dataset folder (default for embedded: data/embedded, generated on first use)")
    p.add_argument("--noise", type=float, help="share of training captions shuffled, in [0, 1)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the noise permutation (kept apart from --seed)")
    p.add_argument("--model", help="open_clip model name (nc-tiny is the embedded CPU model)")
    p.add_argument("--pretrained", help="open_clip tag (openai), a local weights file, or none (default: see below)")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="pairs per optimiser step (global, over all processes)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW")
    p.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay")
    p.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay (official: 0.2)")
    p.add_argument("--seed", type=int, default=99, help="training seed (official: 99)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--out-dir", help="where log.txt, results.json and checkpoints go (default: out/<script>-<dataset>-n<noise>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue from out-dir/last.pt")
    return p


def parse(p, script, argv=None):
    args = p.parse_args(argv)
    defaults = dict(EMBEDDED if args.dataset == "embedded" else REAL, **({"noise": 0.0} if args.dataset == "cc120k" else {}))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.data_root is None:
        if args.dataset != "embedded":
            raise UserError(f"--data-root is required for --dataset {args.dataset}")
        args.data_root = "data/embedded"
    if not 0 <= args.noise < 1:
        raise UserError(f"--noise must be in [0, 1), got {args.noise}")
    clean = "-clean" if getattr(args, "clean_only", False) else ""
    args.out_dir = args.out_dir or f"out/{script}{clean}-{args.dataset}-n{args.noise:g}"
    return args


def run(main):
    """Call main(); a UserError becomes one line on stderr and exit status 2 (also from a DataLoader worker)."""
    try:
        main()
    except UserError as e:
        line = [s for s in str(e).splitlines() if s.strip()][-1].strip()
        print(f"error: {line.split('UserError: ')[-1]}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# Setup, DDP (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE), logging
def setup(args):
    """Join the process group under torchrun, pick the device, seed everything. Returns the device."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    random.seed(args.seed + rank())
    np.random.seed(args.seed + rank())
    torch.manual_seed(args.seed + rank())
    return torch.device(device)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def gather(x):
    """Concatenate x (B, ...) from all processes (W*B, ...), keeping the gradient of every part."""
    return torch.cat(torch.distributed.nn.functional.all_gather(x)) if world() > 1 else x


class Log:
    """Print on rank 0 and append the same line to out_dir/log.txt."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / "log.txt"
        if rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line):
        if rank() == 0:
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


# ---------------------------------------------------------------------------------------------------------
# Models. nc-tiny: embed 128, 64 px ViT (patch 16, width 128, 3 layers), text width 128, 3 layers, context 32.
TINY = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}
_cfg_dir = Path(tempfile.mkdtemp(prefix="nc-configs-"))
(_cfg_dir / "nc-tiny.json").write_text(json.dumps(TINY))
open_clip.add_model_config(_cfg_dir)
TINY_PRETRAIN = dict(steps=800, batch_size=128, lr=1e-3, wd=0.1, warmup=100)  # measured in EMBEDDED.md


def resolve_weights(model, pretrained):
    """(weights file or None, open_clip kwargs the tag implies). Fails fast, in one line, when offline."""
    if pretrained in (None, "", "none"):
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise UserError(f"--pretrained {pretrained} is neither a file nor a tag of {model} (tags: {', '.join(tags) or 'none'})")
    kwargs = dict(force_quick_gelu=cfg.get("quick_gelu", False), image_mean=cfg.get("mean"), image_std=cfg.get("std"),
                  image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"))
    repo, name = os.path.split(cfg.get("hf_hub", ""))
    from huggingface_hub import try_to_load_from_cache
    for fname in ["open_clip_model.safetensors", name or "open_clip_pytorch_model.bin"] if repo else []:
        hit = try_to_load_from_cache(repo, fname)
        if isinstance(hit, str):
            return hit, kwargs
    host = "huggingface.co" if repo else urlparse(cfg["url"]).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(f"weights {model}/{pretrained} are not cached and {host} is unreachable: on a machine with internet run "
                        f"python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{pretrained}')\", "
                        "copy ~/.cache/huggingface here, or pass --pretrained /path/to/weights") from None
    return open_clip.download_pretrained(cfg), kwargs


def load_model(args, device, log=print):
    """(model, preprocess, tokenizer) for args.model / args.pretrained; the embedded default is pre-trained here."""
    pretrained = args.pretrained
    if args.dataset == "embedded" and args.model == "nc-tiny" and pretrained is None:
        pretrained = pretrain_tiny(args.data_root, device, log)
    path, kwargs = resolve_weights(args.model, pretrained)
    logging.disable(logging.WARNING)  # open_clip warns of a random init, which the line below states
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=path, device=device, **kwargs)
    except RuntimeError as e:
        raise UserError(f"cannot create {args.model} from {path}: {str(e).splitlines()[0][:300]}") from None
    finally:
        logging.disable(logging.NOTSET)
    log(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), weights: {path or 'random init'}")
    return model, preprocess, open_clip.get_tokenizer(args.model)


def pretrain_tiny(root, device, log=print, **overrides):
    """Pre-train nc-tiny on the clean pre-training split of the embedded data, once; cached in root.

    The embedded analogue of OpenAI's CLIP: every embedded fine-tune starts from it. One random caption per
    image per pass, AdamW + cosine. Returns the weights file.
    """
    hp = dict(TINY_PRETRAIN, **overrides)
    path = Path(root) / "nc-tiny-pretrained.pt"
    if path.exists():
        return str(path)
    data.ensure_embedded(root)
    log(f"pre-training nc-tiny on the embedded pre-training split ({hp}); cached in {path}")
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model(argparse.Namespace(dataset="embedded", model="nc-tiny", pretrained="none"), device, log)
    split = data.load_split("embedded", root, "pretrain")
    first = np.searchsorted(split.img_of_cap, np.arange(len(split.paths)))  # first caption of each image
    counts = np.bincount(split.img_of_cap)
    opt, rng, step = optimizer(model, hp["lr"], hp["wd"]), np.random.default_rng(0), 0
    while step < hp["steps"]:
        pick = first + rng.integers(0, counts)  # one random caption of every image
        pairs = torch.utils.data.Subset(data.Pairs(split, preprocess, tokenizer), pick.tolist())
        for images, tokens, _ in torch.utils.data.DataLoader(pairs, hp["batch_size"], shuffle=True, drop_last=True):
            set_lr(opt, cosine_lr(step, hp["steps"], hp["warmup"], hp["lr"]))
            loss = info_nce(*model(images.to(device), tokens.to(device))).mean()
            train_step(model, opt, loss)
            step += 1
            if step % 100 == 0:
                log(f"pretrain step {step:4d}/{hp['steps']}  loss {loss.item():.4f}")
            if step == hp["steps"]:
                break
    test = data.load_split("embedded", root, "test")
    log(f"nc-tiny zero-shot test: {fmt(evaluate(model, test, preprocess, tokenizer, device))}")
    data.atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Training pieces
def optimizer(model, lr, wd):
    """AdamW with the official betas and eps; no weight decay on gains, biases or logit_scale (open_clip)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for p in params if all(p is not q for q in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_lr(step, total, warmup, lr):
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total` (per optimiser step)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def train_step(model, opt, loss, clip=10.0):
    """Backward, clip the gradient norm (official: 10), step, then clamp the logit scale to ln(100)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    with torch.no_grad():
        getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))


def info_nce(img, txt, scale):
    """Per-sample symmetric InfoNCE: l_i = (CE_i2t(i) + CE_t2i(i)) / 2, img and txt (B, D) normalised -> (B,).

    Under DDP the negatives are the global batch (gathered with gradient); row i's positive is column rank*B + i.
    """
    labels = torch.arange(len(img), device=img.device) + rank() * len(img)
    l_i2t = F.cross_entropy(scale * img @ gather(txt).T, labels, reduction="none")  # (B,)
    l_t2i = F.cross_entropy(scale * txt @ gather(img).T, labels, reduction="none")  # (B,)
    return (l_i2t + l_t2i) / 2


def gmm_clean_prob(x, higher_is_clean=False, max_iter=100):
    """GMM(2) on a per-sample statistic x (N,), min-max normalised -> posterior of the clean component (N,).

    The clean component is the lower-mean one for a loss, the higher-mean one for a similarity.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    gmm = GaussianMixture(2, max_iter=max_iter, tol=1e-2, reg_covar=5e-4, random_state=0).fit(x)
    clean = gmm.means_.argmax() if higher_is_clean else gmm.means_.argmin()
    return gmm.predict_proba(x)[:, clean]


def loader(ds, args):
    """Shuffled training batches of args.batch_size / world pairs per process; the order depends on (seed, epoch)."""
    sampler = torch.utils.data.DistributedSampler(ds, world(), rank(), shuffle=True, seed=args.seed, drop_last=True)
    return torch.utils.data.DataLoader(ds, args.batch_size // world(), sampler=sampler, num_workers=args.workers,
                                       drop_last=True, pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0)


def wrap(model, device):
    """DistributedDataParallel under torchrun, else the model itself."""
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids) if world() > 1 else model


def autocast(device):
    """bf16 autocast on CUDA (weights stay fp32), nothing on the CPU."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------------------------------------------------
# Retrieval evaluation: 5 (or any number of) captions per image
@torch.no_grad()
def features(model, split, preprocess, tokenizer, device, batch_size=256):
    """Normalised image features (n_img, D) and caption features (n_cap, D), each image encoded once."""
    model = getattr(model, "module", model).eval()
    loader = torch.utils.data.DataLoader(data.Images(split.paths, preprocess), batch_size)
    with autocast(device):
        img = [model.encode_image(x.to(device), normalize=True).float() for x, _ in tqdm(loader, "images", leave=False, disable=None)]
        txt = [model.encode_text(tokenizer(split.captions[i:i + batch_size]).to(device), normalize=True).float()
               for i in range(0, len(split.captions), batch_size)]
    return torch.cat(img), torch.cat(txt)


def recall(sims, img_of_cap):
    """R@1/5/10 both ways and rSum from sims (n_img, n_cap).

    i2t: an image is a hit at K if its best-ranked own caption is in its top K.
    t2i: a caption is a hit at K if its image is in its top K. Ties count in the query's favour.
    """
    owner = torch.as_tensor(img_of_cap, device=sims.device)
    pos = sims[owner, torch.arange(len(owner), device=sims.device)]  # (n_cap,) each caption with its image
    t2i_rank = (sims > pos[None, :]).sum(0)  # (n_cap,) images scored above the caption's own
    best = torch.full((len(sims),), -math.inf, device=sims.device).scatter_reduce(0, owner, pos, "amax")  # (n_img,)
    i2t_rank = (sims > best[:, None]).sum(1)  # (n_img,) captions scored above the best own one
    r = {f"{d}_r{k}": 100 * (rank < k).float().mean().item() for d, rank in (("i2t", i2t_rank), ("t2i", t2i_rank))
         for k in (1, 5, 10)}
    r["rsum"] = sum(r.values())
    return r


def evaluate(model, split, preprocess, tokenizer, device, coco_1k=False):
    """Recalls on a split; with coco_1k also the mean over five folds of 1,000 images (key 'coco1k')."""
    img, txt = features(model, split, preprocess, tokenizer, device)
    sims = img @ txt.T  # (n_img, n_cap)
    r = recall(sims, split.img_of_cap)
    if coco_1k:
        r["coco1k"] = fold_recall(sims, split.img_of_cap)
    return r


def fold_recall(sims, img_of_cap, fold=1000):
    """Mean of each recall over consecutive folds of `fold` images and their captions (COCO 1K: 5 folds).

    Each fold's six recalls are computed in full (the official NPC/SDD code adds i2t R@10 into t2i R@10).
    """
    img_of_cap = np.asarray(img_of_cap)
    folds = []
    for f in range(len(sims) // fold):
        caps = np.flatnonzero(img_of_cap // fold == f)
        folds.append(recall(sims[f * fold:(f + 1) * fold][:, caps], img_of_cap[caps] - f * fold))
    return {k: float(np.mean([r[k] for r in folds])) for k in folds[0]}


def fmt(r):
    """One line: i2t R@1/5/10, t2i R@1/5/10, rSum."""
    return (f"i2t {r['i2t_r1']:5.1f} {r['i2t_r5']:5.1f} {r['i2t_r10']:5.1f}  "
            f"t2i {r['t2i_r1']:5.1f} {r['t2i_r5']:5.1f} {r['t2i_r10']:5.1f}  rsum {r['rsum']:6.1f}")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: written whole (temp file, then rename), read with weights_only=True
def save_checkpoint(path, obj):
    data.atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None


def resume(args, method, model, opt):
    """Restore model and optimiser from out_dir/last.pt. -> (next epoch, best dev rSum, per-epoch history)."""
    ck = load_checkpoint(Path(args.out_dir) / "last.pt")
    if ck.get("method") != method or ck["args"]["model"] != args.model:
        raise UserError(f"{args.out_dir}/last.pt is a {ck.get('method')} checkpoint of {ck['args']['model']}, "
                        f"not {method} of {args.model}")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return ck["epoch"] + 1, ck["best"], ck["history"]


def save_epoch(args, method, model, opt, epoch, best, history, extra=None):
    """last.pt every epoch; best.pt when dev rSum (history[-1]) beats `best`. Returns the new best."""
    dev = history[-1]["dev"]["rsum"]
    ck = dict(method=method, args=vars(args), model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
              best=max(best, dev), history=history, **(extra or {}))
    if rank() == 0:
        if dev > best:
            save_checkpoint(Path(args.out_dir) / "best.pt", ck)
        save_checkpoint(Path(args.out_dir) / "last.pt", ck)
    return max(best, dev)


def finish(args, method, model, test, preprocess, tokenizer, device, log, history, extra=None):
    """Test the best-dev checkpoint, log it and write out_dir/results.json (whole). Returns the test recalls."""
    ck = load_checkpoint(Path(args.out_dir) / "best.pt")
    model.load_state_dict(ck["model"])
    r = evaluate(model, test, preprocess, tokenizer, device, coco_1k=args.dataset == "coco")
    log(f"test (best dev epoch {ck['epoch'] + 1}): {fmt(r)}")
    if "coco1k" in r:
        log(f"test COCO 1K (5 folds): {fmt(r['coco1k'])}")
    results = dict(method=method, args=vars(args), best_epoch=ck["epoch"] + 1, test=r, history=history, **(extra or {}))
    if rank() == 0:
        data.atomic_write(Path(args.out_dir) / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    return r
