"""Shared pieces of every script: setup and DDP, CLIP loading, per-sample InfoNCE, GMM, retrieval
evaluation, checkpoint files (runs.py holds the flags, the run's folder and the training steps). Definitions
only: importing this file runs nothing but registering nc-tiny."""
import logging
import math
import os
import pickle
import random
import socket
import warnings

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

import data
from data import UserError

# its successor is private
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated")

# ---- Setup, DDP (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE), logging
def setup(args):
    """Join the process group under torchrun, pick the device, seed everything. Returns the device."""
    device = check_device(args.device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)  # NCCL collectives (barrier, all_reduce) run on the current device
    torch.backends.cudnn.allow_tf32 = False  # fp32 passes (memory losses, features) stay fp32 in convolutions
    start_epoch(None, args, -1)
    return torch.device(device)


def check_device(name):
    """--device (None: cuda if there is a GPU, else cpu) -> its name, or one line if this machine lacks it."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device name (cpu, cuda, cuda:1 ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return name


def start_epoch(loader, args, epoch):
    """The batch order and every random generator depend on (seed, rank, epoch) only: --resume is exact."""
    if loader is not None:
        loader.sampler.set_epoch(epoch)
    for seed_fn in (random.seed, np.random.seed, torch.manual_seed):
        seed_fn((args.seed + rank() + 1000 * (epoch + 1)) % 2**32)  # numpy's seeds stop at 2**32 - 1


def global_mean(xs):
    """The mean of an epoch's per-step values over every process (all take the same number of steps)."""
    if world() == 1:
        return float(np.mean(xs))
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    m = torch.tensor(float(np.mean(xs)), dtype=torch.float64, device=device)
    dist.all_reduce(m)
    return m.item() / world()


def rank():  # this process's index under torchrun, else 0
    return dist.get_rank() if dist.is_initialized() else 0


def world():  # the number of processes
    return dist.get_world_size() if dist.is_initialized() else 1


def gather(x):
    """Concatenate x (B, ...) of all processes -> (W*B, ...), the gradient flowing through every part."""
    return torch.cat(torch.distributed.nn.functional.all_gather(x)) if world() > 1 else x


# ---- Models. nc-tiny: embed 128; ViT 64 px, patch 16, width 128; text width 128, context 32; 3 layers each
open_clip.factory._MODEL_CONFIGS["nc-tiny"] = {  # what add_model_config would read from a JSON file
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}


def resolve_weights(model, pretrained):
    """(weights file or None, open_clip kwargs the tag implies). Fails fast, in one line, when offline. A
    checkpoint of these scripts is a weights file too, with the kwargs of the weights its run started from."""
    if pretrained in (None, "", "none"):
        return None, {}
    if os.path.isfile(pretrained):
        own = own_checkpoint(pretrained)
        if own is None:
            return pretrained, {}
        theirs = own["args"].get("model")
        if theirs != model:
            raise UserError(f"{pretrained} is a checkpoint of {theirs}, not {model}: pass --model to match")
        return pretrained, tag_kwargs(model, own["args"].get("pretrained"))
    kwargs = tag_kwargs(model, pretrained)  # one line for an unknown tag
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    from huggingface_hub import try_to_load_from_cache
    repo, name = os.path.split(cfg.get("hf_hub", ""))
    files = ("open_clip_model.safetensors", name or "open_clip_pytorch_model.bin")
    for hit in [try_to_load_from_cache(repo, f) for f in files] if repo else []:
        if isinstance(hit, str):
            return hit, kwargs
    host = "huggingface.co" if repo else cfg["url"].split("/")[2]
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        cmd = f"python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{pretrained}')\""
        raise UserError(f"weights {model}/{pretrained} are not cached and {host} is unreachable: "
                        f"where there is internet run {cmd}, "
                        "copy ~/.cache/huggingface here, or pass --pretrained /path/to/weights") from None
    return open_clip.download_pretrained(cfg), kwargs


def tag_kwargs(model, pretrained):
    """The open_clip kwargs a tag implies (activation, normalisation, resizing); {} for none or a file."""
    if pretrained in (None, "", "none") or os.path.isfile(pretrained):
        return resolve_weights(model, pretrained)[1]
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(f"--pretrained {pretrained} is neither a file nor a tag of {model} (tags: {tags})")
    return {"force_quick_gelu": cfg.get("quick_gelu", False), "image_mean": cfg.get("mean"),
            "image_std": cfg.get("std"), "image_interpolation": cfg.get("interpolation"),
            "image_resize_mode": cfg.get("resize_mode")}


def looks_like_weights(path):
    """Whether the file can hold weights open_clip reads: by name (.safetensors, .npz) or by its first bytes
    (torch.save writes a zip file, or a pickle in older versions)."""
    if str(path).endswith((".safetensors", ".npz")):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def own_checkpoint(path):
    """A checkpoint these scripts wrote ({"model": state dict, "args": its flags, ...}), else None."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (not a torch.save file: open_clip reads it, or says why not)
        return None
    return ck if isinstance(ck, dict) and {"method", "model", "args"} <= ck.keys() else None


def load_model(model_name, pretrained, device, log=print):
    """(model, preprocess, tokenizer): an open_clip model with weights from a tag, a file (open_clip's, or a
    checkpoint of these scripts), or none (random init)."""
    path, kwargs = resolve_weights(model_name, pretrained)
    if path and not looks_like_weights(path):
        raise UserError(f"cannot create {model_name} from {path}: not a checkpoint (a torch.save file, "
                        ".safetensors or .npz)")
    own = own_checkpoint(path) if path else None
    logging.disable(logging.WARNING)  # open_clip warns of a random init, which the line below states
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if own else path, device=device, **kwargs)
        if own:
            model.load_state_dict(own["model"])
    except Exception as e:  # noqa: BLE001 (not weights, or weights of another model: the same to the user)
        cause = " ".join(line.strip() for line in str(e).splitlines())  # state_dict errors: cause on line 2
        raise UserError(f"cannot create {model_name} from {path} "
                        f"({e.__class__.__name__}: {cause[:300]})") from None
    finally:
        logging.disable(logging.NOTSET)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"model {model_name} ({millions:.2f}M parameters), weights: {path or 'random init'}")
    return model, preprocess, open_clip.get_tokenizer(model_name)


# ---- Per-sample InfoNCE and the GMM
def info_nce(img, txt, scale, local=False):
    """Per-sample symmetric InfoNCE, l_i = (CE_i2t(i) + CE_t2i(i)) / 2: img, txt (B, D) normalised -> (B,).
    Under DDP the negatives are the global batch, gathered with gradient (row i's positive: column
    rank*B + i), unless local."""
    all_img, all_txt, offset = img, txt, 0
    if not local and world() > 1:
        all_img, all_txt, offset = gather(img), gather(txt), rank() * len(img)
    # ---- EXERCISE info_nce: img, txt (B, D), all_img, all_txt (n, D), offset, scale () -> l (B,) ----
    # CLIP's symmetric cross-entropy, kept per sample (no mean). Row i's positive is column p = offset + i:
    #   l_i = (-log softmax_j(s img_i . all_txt_j)[p] - log softmax_j(s txt_i . all_img_j)[p]) / 2
    labels = torch.arange(len(img), device=img.device) + offset  # (B,) the positives' columns
    l_i2t = F.cross_entropy(scale * img @ all_txt.T, labels, reduction="none")  # (B,) image -> its caption
    l_t2i = F.cross_entropy(scale * txt @ all_img.T, labels, reduction="none")  # (B,) caption -> its image
    l = (l_i2t + l_t2i) / 2  # (B,)
    # ---- END EXERCISE ----
    return l


@torch.no_grad()
def pair_losses(img, txt, scale, batch_size, seed=0):
    """Per-sample InfoNCE of img, txt (N, D) in seeded random batches -> (N,), the same in every process."""
    perm = torch.randperm(len(img), generator=torch.Generator().manual_seed(seed))
    losses = torch.cat([info_nce(img[b], txt[b], scale, local=True).cpu() for b in perm.split(batch_size)])
    return losses[perm.argsort()]


def gmm_fit(x, max_iter=100):
    """GMM(2) on a per-sample statistic x (N,), min-max normalised to [0, 1] -> (fitted mixture, x (N, 1))."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    return GaussianMixture(2, max_iter=max_iter, tol=1e-2, reg_covar=5e-4, random_state=0).fit(x), x


def gmm_clean_prob(x, higher_is_clean=False, max_iter=100):
    """GMM(2) on a per-sample statistic x (N,), min-max normalised -> posterior of the clean component (N,):
    the lower-mean component for a loss, the higher-mean one for a similarity."""
    gmm, x = gmm_fit(x, max_iter)  # the fitted mixture, x (N, 1) scaled to [0, 1]
    # ---- EXERCISE gmm_clean_prob: gmm (fitted, 2 components), x (N, 1), higher_is_clean -> p_clean (N,) ----
    # The memorization effect (NCR): clean pairs are learnt first, so they sit in the low-loss component.
    #   p_clean_i = pi_c N(x_i; mu_c, var_c) / sum_k pi_k N(x_i; mu_k, var_k)   (gmm.predict_proba gives it)
    #   c = argmin_k mu_k for a loss, argmax_k mu_k for a similarity: by the means, never by index
    clean = gmm.means_.argmax() if higher_is_clean else gmm.means_.argmin()  # the clean component
    p_clean = gmm.predict_proba(x)[:, clean]  # (N,)
    # ---- END EXERCISE ----
    return p_clean


# ---- Retrieval evaluation, any number of captions per image
@torch.no_grad()
def features(model, split, pixels, tokenizer, device, batch_size=256, local=False):
    """Normalised image features (n_img, D), each image encoded once, and caption features (n_cap, D), in
    fp32 (bf16 changed the top-1 of 6-10% of retrieval queries in an emulation). Under DDP (unless local) each
    process encodes every W-th image and caption, then the processes gather the whole."""
    model = getattr(model, "module", model).eval()
    r, w = rank(), world()  # this process encodes items r, r + w, r + 2w ...
    if local:
        r, w = 0, 1
    shard = torch.utils.data.Subset(pixels.images(split.paths), range(r, len(split.paths), w))
    caps = split.captions[r::w]
    batches = tqdm(torch.utils.data.DataLoader(shard, batch_size), "images", leave=False, disable=None)
    img = [model.encode_image(pixels.normalize(x.to(device)), normalize=True) for x, _ in batches]
    txt = [model.encode_text(tokenizer(caps[i:i + batch_size]).to(device), normalize=True)
           for i in range(0, len(caps), batch_size)]
    return _unshard(torch.cat(img), len(split.paths), w), _unshard(torch.cat(txt), len(split.captions), w)


def chunked(fn, n, chunk):
    """fn(lo, hi) -> (hi - lo, ...) for rows lo:hi of n, in chunks of `chunk` rows. Under DDP each process
    computes every W-th chunk, then all n rows are gathered in order (on the CPU), equal to one process's."""
    mine = [fn(lo, min(lo + chunk, n)).cpu() for lo in range(rank() * chunk, n, world() * chunk)]
    if world() == 1:
        return torch.cat(mine)
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    return torch.cat([parts[j % world()][j // world()] for j in range(-(-n // chunk))])


def _unshard(x, n, w):
    """x (~n / w, D): rows r, r + w, r + 2w ... of n, from process r -> all n rows, in order, everywhere."""
    if w == 1:
        return x
    parts = [x.new_zeros(-(-n // w), x.shape[1]) for _ in range(w)]
    dist.all_gather(parts, torch.cat([x, x.new_zeros(len(parts[0]) - len(x), x.shape[1])]))
    return torch.stack(parts, 1).flatten(0, 1)[:n]  # (n / w, w, D): row j of process r is item j * w + r


def recall(sims, img_of_cap):
    """R@1/5/10 both ways and rSum from sims (n_img, n_cap). i2t: an image is a hit at K if its best-ranked
    own caption is in its top K; t2i: a caption is a hit at K if its image is in its top K. A tie, or a NaN,
    counts against the query: a constant or diverged model scores no better than chance, never 100."""
    owner = torch.as_tensor(img_of_cap, device=sims.device)
    cols = torch.arange(len(owner), device=sims.device)
    own = torch.zeros_like(sims, dtype=torch.bool)
    own[owner, cols] = True  # (n_img, n_cap) the pairs that belong together
    pos = sims[owner, cols]  # (n_cap,) each caption with its own image
    t2i_rank = (~(sims < pos[None, :]) & ~own).sum(0)  # (n_cap,) other images at or above the caption's own
    floor = torch.full((len(sims),), -math.inf, dtype=sims.dtype, device=sims.device)  # (n_img,)
    best = floor.scatter_reduce(0, owner, pos, "amax")
    i2t_rank = (~(sims < best[:, None]) & ~own).sum(1)  # (n_img,) others' captions >= its best own caption
    r = {f"{d}_r{k}": 100 * (ranks < k).float().mean().item()
         for d, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)) for k in (1, 5, 10)}
    return dict(r, rsum=sum(r.values()))


def fold_recall(sims, img_of_cap, fold=1000):
    """Mean recalls over consecutive folds of `fold` images and their captions (COCO 1K: five folds), each
    fold's six recalls in full (the official NPC/SDD code adds i2t R@10 into t2i R@10 here). The images after
    the last whole fold are left out, and "left_out" says how many; None with fewer images than one fold."""
    img_of_cap = np.asarray(img_of_cap)
    if len(sims) < fold:
        return None
    folds = [recall(sims[f * fold:(f + 1) * fold][:, img_of_cap // fold == f],
                    img_of_cap[img_of_cap // fold == f] - f * fold)
             for f in range(len(sims) // fold)]
    return dict({k: float(np.mean([r[k] for r in folds])) for k in folds[0]}, left_out=len(sims) % fold)


def evaluate(model, split, pixels, tokenizer, device, coco_1k=False, local=False):
    """Recalls on a split; with coco_1k also the five-fold 1K means, under key 'coco1k'. A model whose
    features are not finite is an error, never a score of 0."""
    img, txt = features(model, split, pixels, tokenizer, device, local=local)
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):  # a finite loss, then a step too far
        raise UserError("the model's features are not finite: its weights diverged (a learning rate too "
                        "high?), so it has no score; the checkpoints of earlier epochs are kept")
    sims = img @ txt.T  # (n_img, n_cap)
    return dict(recall(sims, split.img_of_cap),
                **({"coco1k": fold_recall(sims, split.img_of_cap)} if coco_1k else {}))


def fmt_1k(r, n_img):
    """The COCO 1K line: the fold means, or why there are none or which images they leave out."""
    if r is None:
        return f"COCO 1K: none, the split has {n_img} images, fewer than one fold of 1000"
    left = f", the last {r['left_out']} images left out (not a whole fold)" if r["left_out"] else ""
    return f"COCO 1K (mean of {n_img // 1000} folds{left}): {fmt(r)}"


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
    except pickle.UnpicklingError:  # weights_only refused: not what torch.save writes of tensors and values
        raise UserError(f"cannot read checkpoint {path}: "
                        "it is not a torch.save file of tensors and plain values") from None
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file means the same thing to the user)
        raise UserError(f"cannot read checkpoint {path} "
                        f"({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
