"""NPC: Negative Pre-aware Cross-modal matching (Zhang et al., AAAI 2024, arXiv 2312.05777), in the paper's
per-sample form.

Before training, the starting CLIP picks a clean set (a GMM on per-sample losses) and gives every pair two
"memory pairs": the clean pair with the nearest image and the clean pair with the nearest caption. Each step,
a siamese copy of the model takes one look-ahead step on the batch; a pair whose step raises the loss of its
own memory pairs would hurt the model on clean data, so its loss is down-weighted. The memory pairs are also
trained on. Here the bank is read again from the model before each later epoch (--fixed-bank: the paper's).

    python npc.py                        # embedded data, tiny CLIP, CPU
    python npc.py --noise 0.8
    python npc.py --official-loss        # the official code's loss, for comparison (see below)
    python npc.py --no-lookahead         # the ablation w = 1: the memory term without the weight
    python npc.py --fixed-bank           # the paper's bank, read once from the starting model
    python npc.py --dataset f30k --data-root /data/f30k --noise 0.4      # ViT-B-32 'openai' on a GPU
    torchrun --standalone --nproc_per_node=4 npc.py --dataset coco --data-root /data/coco

Paper -> code:
    A, A'                       model, siamese (the look-ahead copy: made once, overwritten in place a step)
    memory bank of clean pairs  bank_img, bank_txt (N,): the clean pair nearest to pair k by image, by caption
    l_i                         l (B,)        per-sample InfoNCE of the batch under A
    l^I_i(t), l^T_i(t)          l_I, l_T (B,) InfoNCE among the B image-side / text-side memory pairs, before
    l^I_i(t+1), l^T_i(t+1)      l_I_after, l_T_after (B,) the same after A' took its step on the batch
    r_i, w_i                    r, w (B,)     w_i = tanh(r_i) if r_i < 1 else 1, no gradient through it
    L = mean_i w_i l_i + L_mb   loss; L_mb = mean_i (m_I_i + m_T_i), the memory losses under A with gradient

The look-ahead's optimiser: A' takes the step A's own optimiser would take on the batch, so before each
look-ahead A' receives A's weights, AdamW moments and current learning rate (copied in place) and uses the
same clipping.

Deviations from the official code (github.com/ZhangXu0963/NPC; file:line at 823d781), and why:
  - per-sample weights: the official batch losses are means (clip/criterions.py:19-20), so its w collapses to
    one scale per batch, mean(w) * mean(l) (main_NPC.py:183); the paper weights each l_i. --official-loss
    restores the collapse.
  - the memory term is trained on (under A, with gradient), as in the paper; the official code computes it on
    A' under no_grad (main_NPC.py:150-158), a constant that changes nothing. --official-loss restores the
    constant. --official-loss reproduces the official loss only: the deviations below stay.
  - the look-ahead loss is the symmetric mean, its backward runs once; the official one sums the two
    directions' means (main_NPC.py:165) and calls backward() twice (:169-170), 4x the gradient. The
    look-ahead step is clipped at norm 10, as A's (:190); the official siamese step (:171) is not.
  - the look-ahead starts from A's AdamW moments each step; the official siamese optimiser is made once
    (main_NPC.py:88) and keeps its own moments while its weights are copied from A each step (:147-148), so
    its step is not the one A would take.
  - neighbours are searched with normalised features on both sides; the official search leaves the clean
    ones raw (get_memorybank.py:34-35 against the normalised queries of :88-89).
  - the bank is built here, deterministically, from the starting model; the official get_mbank
    (get_memorybank.py:10) is called by no script (its `logger` is undefined) and main_NPC.py reads the bank
    from .npy files (data.py:103-104). Its per-sample losses come from seeded random batches of --batch-size
    pairs, so that a batch rarely holds several captions of one image. The GMM sees the losses min-max scaled
    to [0, 1] (common.gmm_fit), so its reg_covar 5e-4 is relative to their range; the official GMM fits the
    raw losses (get_memorybank.py:51-53). With --resume the bank is rebuilt as the run had it: the
    starting model's, then the resumed model's.
  - the bank is rebuilt from the current model before every epoch after the first (one features pass of the
    training pairs); the paper's is read once from the starting model, which --fixed-bank keeps. Measured
    never worse at noise 0.2 to 0.8 and 7.2 rSum better from a weak starting model (README, npc.py).
  - the memory losses before and after the look-ahead are computed in fp32, without gradient, even when
    training runs in bf16: at the real-data lr (1e-5) one step moves r by about as much as bf16 rounding does,
    and bf16 and fp32 then disagree on which pairs get w < 1 (README, "Precision"). This costs a separate
    forward of the 2B memory pairs before the step: 13 forward-equivalents a pair against a plain step's 3.
  - lr, schedule, model selection: as baseline.py (lr 1e-5 on real data, not 2e-7 as README.md:195; see its
    docstring); no weight decay on biases, gains and logit_scale, and the logit scale clamped to ln 100 after
    each step, as open_clip's training code (runs.optimizer, runs.train_step); the official AdamW decays
    every parameter (main_NPC.py:84) and never clamps.
Defaults: those of baseline.py (embedded: batch 128, lr 5e-4, 50 warm-up steps, 3 epochs).
Infrastructure as baseline.py. --compile compiles the training forwards and backwards of A and A'; the fp32
memory passes stay eager: they call the bare modules without gradient, and their time is fp32 matrix products.
What the memory term does: most memory pairs are the pair itself or a caption of its own image. A clean-set
pair's text-side neighbour is itself, and its image-side neighbour a clean caption of its own image (the image
features of one image's captions are equal). For a noisy pair, the image-side neighbour is a clean caption of
its own image too. So the memory term trains every image with a caption the bank trusts: it works as label
correction, and a clean-set pair's w is about 1 by construction. The bank line logs both shares; on the
embedded data at noise 0.4, 39% of the memory pairs are the pair itself and 78% share its image (97% of the
noisy pairs' image sides). And w differs between pairs only through which memory pairs are measured: A' takes
one step on the whole batch, and every pair sees the same step. On the embedded data the look-ahead weight
separates clean from noisy pairs only weakly (mean w about 0.84 against 0.82); NPC's gain here is the memory
term's (--no-lookahead does as well); the README gives the measurements.
"""
import copy
import functools
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import common
import data
import embedded
import runs

# ---- defaults of the two settings: --dataset embedded takes the first, any other dataset the second
EMBEDDED = {  # the generated data and the tiny CLIP on 2 CPU cores, as baseline.py
    "data_root": "data/embedded", "model": "nc-tiny", "pretrained": None, "noise": 0.4,
    "epochs": 3, "batch_size": 128, "lr": 5e-4, "warmup": 50, "workers": 0,
}
REAL = {  # Flickr30K, MS-COCO, CC120K on a GPU: the official settings, except the lr (as baseline.py)
    "data_root": None, "model": "ViT-B-32", "pretrained": "openai", "noise": 0.4,
    "epochs": 5, "batch_size": 256, "lr": 1e-5, "warmup": 500, "workers": 8,
}

# ---- flags (-h shows every default; None here: the setting's value, from the dicts above)
parser = runs.Parser(__doc__, EMBEDDED, REAL)
parser.add_argument("--dataset", default="embedded", choices=data.DATASETS, help="the data")
parser.add_argument("--data-root", help="dataset folder (embedded: generated on first use)")
parser.add_argument("--noise", type=float, help="share of training captions shuffled, in [0, 1)")
parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise permutation")
parser.add_argument("--model", help="open_clip model name (nc-tiny: the embedded CPU model)")
parser.add_argument("--pretrained", help="open_clip tag, weights file or none (embedded None: the tiny CLIP)")
parser.add_argument("--epochs", type=int, help="training epochs")
parser.add_argument("--batch-size", type=int, help="pairs per optimiser step, over all processes")
parser.add_argument("--lr", type=float, help="peak learning rate of AdamW (the look-ahead's too)")
parser.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay")
parser.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay, official")
parser.add_argument("--seed", type=int, default=99, help="training seed, official")
parser.add_argument("--workers", type=int, help="DataLoader worker processes (at most the cores)")
parser.add_argument("--out-dir", help="log, checkpoints, results (default: out/<method>-<dataset>-n<noise>)")
parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if there is a GPU)")
parser.add_argument("--resume", action="store_true", help="continue the run in out-dir (the bank is rebuilt)")
parser.add_argument("--overwrite", action="store_true", help="delete the run already in out-dir, start again")
parser.add_argument("--bank-threshold", type=float, default=0.9, help="clean set: p_clean above it, official")
parser.add_argument("--no-image-cache", action="store_true", help="decode every image with PIL each time")
parser.add_argument("--precision", choices=("bf16", "fp32"), help="autocast of forwards (CUDA default: bf16)")
parser.add_argument("--compile", action="store_true", help="torch.compile the training passes of A and A'")
parser.add_argument("--official-loss", action="store_true", help="official loss: batch-mean w, constant L_mb")
parser.add_argument("--no-lookahead", action="store_true", help="the ablation w = 1: no look-ahead step")
parser.add_argument("--fixed-bank", action="store_true", help="the paper's bank: the starting model's")


# ---- the memory bank: from the starting model, then (unless --fixed-bank) from each epoch's
def nearest(queries, keys, chunk=2048):
    """Index of the key with the highest dot product, for each query: (Q, D), (K, D) -> (Q,) numpy, in chunks
    of queries shared among the processes under DDP."""
    return common.chunked(lambda lo, hi: (queries[lo:hi] @ keys.T).argmax(1), len(queries), chunk).numpy()


def neighbours(img, txt, owner, clean):
    """For every pair k: bank_img[k], the clean pair whose image is nearest to k's image, and bank_txt[k], the
    clean pair whose caption is nearest to k's caption (cosine; a clean pair is its own text-side neighbour).
    img (n_img, D), txt (N, D) normalised, owner (N,) image of each pair, clean (C,) pair indices
    -> bank_img, bank_txt (N,)."""
    # ---- EXERCISE neighbours: img, txt, owner, clean (C,) -> bank_img, bank_txt (N,) pair indices ----
    # For every pair k, the clean pair nearest to it on each side (normalised features: cosine = dot product;
    # nearest(queries, keys) gives each query's argmax over the keys):
    #   bank_img[k] = argmax_{c in C} img[owner[k]] . img[owner[c]]
    #   bank_txt[k] = argmax_{c in C} txt[k] . txt[c]
    c = torch.as_tensor(clean, device=img.device)  # (C,)
    nearest_image = nearest(img, img[owner[c]])  # (n_img,) index into clean of the nearest clean image
    bank_img = clean[nearest_image[owner.cpu().numpy()]]  # (N,) each pair takes its image's
    bank_txt = clean[nearest(txt, txt[c])]  # (N,)
    # ---- END EXERCISE ----
    return bank_img, bank_txt


def memory_bank(img, txt, owner, scale, is_noisy, args):
    """NPC's memory bank from the starting model's features img (n_img, D), txt (N, D), owner (N,) and logit
    scale: per-sample losses, GMM, clean set C = {k : p_clean(l_k) > threshold}, the neighbours of every pair
    in C. -> bank_img, bank_txt (N,) indices of training pairs, and the bank's figures (against the true
    mask)."""
    loss = common.pair_losses(img[owner], txt, scale, args.batch_size, args.seed)  # (N,) l_k
    p_clean = common.gmm_clean_prob(loss)  # (N,) posterior of the low-loss component
    clean = np.flatnonzero(p_clean > args.bank_threshold)  # C, indices of training pairs
    if len(clean) == 0:
        raise data.UserError(f"the memory bank is empty: no pair has clean posterior > {args.bank_threshold}")
    bank_img, bank_txt = neighbours(img, txt, owner, clean)
    memory = np.concatenate([bank_img, bank_txt])  # (2N,) every pair's two memory pairs
    pair = np.tile(np.arange(len(txt)), 2)  # (2N,) whose they are
    image = owner.cpu().numpy()  # (N,) the image of each pair
    auc = float(roc_auc_score(~is_noisy, p_clean)) if 0 < is_noisy.mean() < 1 else None
    stats = {"size": len(clean), "expected_clean": float(p_clean.sum()), "auc": auc}
    stats["self"] = float(np.mean(memory == pair))  # the memory pair is the pair itself
    stats["same_image"] = float(np.mean(image[memory] == image[pair]))  # a caption of the pair's own image
    # against the true mask
    stats["precision"] = float(1 - is_noisy[clean].mean())
    stats["recall"] = float((~is_noisy[clean]).sum() / max(1, (~is_noisy).sum()))
    stats["noisy_memory_pairs"] = float(np.mean(is_noisy[memory]))
    own = image[bank_img[is_noisy]] == image[is_noisy]  # a noisy pair's image side: its own image?
    stats["noisy_own_image"] = float(own.mean()) if is_noisy.any() else None
    return bank_img, bank_txt, stats


def build_bank(model, train, pixels, tokenizer, device, is_noisy, args, log):
    """The memory bank from the model's features of the training pairs, and its log lines."""
    img, txt = common.features(model, train, pixels, tokenizer, device)  # (n_img, D), (N, D) normalised
    owner = torch.as_tensor(train.img_of_cap, device=img.device)  # (N,) the image of each pair
    scale = model.logit_scale.exp().item()
    bank_img, bank_txt, bank = memory_bank(img, txt, owner, scale, is_noisy, args)
    log(f"memory bank: clean set {bank['size']} of {len(txt)} pairs (p_clean > {args.bank_threshold}); "
        f"against the true mask precision {bank['precision']:.3f} recall {bank['recall']:.3f}")
    if bank["size"] < 0.5 * bank["expected_clean"]:  # read off the GMM alone: real data has no true mask
        log(f"memory bank: warning: the clean set is {bank['size']} pairs ({bank['size'] / len(txt):.0%}), "
            f"under half of the {bank['expected_clean']:.0f} the GMM takes for clean: the model tells the "
            "pairs apart poorly, so the bank is small and may be noisy (it is rebuilt each epoch, unless "
            "--fixed-bank)")
    log(f"memory bank: {bank['self']:.1%} of the memory pairs are the pair itself, {bank['same_image']:.1%} "
        f"share its image (a noisy pair's image side: its own image for {bank['noisy_own_image'] or 0:.1%})")
    log(f"memory bank: AUC {bank['auc'] or float('nan'):.3f}; "
        f"{bank['noisy_memory_pairs']:.1%} of the memory pairs are noisy")
    return bank_img, bank_txt, bank


class WithMemory(torch.utils.data.Dataset):
    """Pair k -> (image, tokens, k) of pair k, then of its memory pairs bank_img[k] and bank_txt[k]."""

    def __init__(self, pairs, bank_img, bank_txt):
        self.pairs, self.bank_img, self.bank_txt = pairs, bank_img, bank_txt

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        return (*self.pairs[k], *self.pairs[self.bank_img[k]], *self.pairs[self.bank_txt[k]])


# ---- the look-ahead and the weight
def memory_losses(model, images, tokens):
    """l_I, l_T (B,): InfoNCE among the B image-side and among the B text-side memory pairs, images and tokens
    (2B, ...) in that order; in fp32 and without gradient, whatever the autocast around it (a look-ahead step
    moves them by about as much as bf16 rounding would)."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        img, txt, scale = model(images, tokens)  # (2B, D), (2B, D), ()
        l_I, l_T = (common.info_nce(a, b, scale) for a, b in zip(img.chunk(2), txt.chunk(2)))
    return l_I, l_T


@torch.no_grad()
def copy_into(siamese, siamese_opt, model, opt):
    """A' <- A: weights, AdamW state and learning rate, copied in place (state tensors: made at first)."""
    for group_s, group in zip(siamese_opt.param_groups, opt.param_groups):
        group_s["lr"] = group["lr"]
    for q, p in zip(siamese.parameters(), model.parameters()):
        q.copy_(p)
        for name, value in opt.state.get(p, {}).items():
            state = siamese_opt.state[q]
            state[name] = state[name].copy_(value) if name in state else value.clone()


def npc_weight(l_I, l_T, l_I_after, l_T_after):
    """NPC's weight from the memory losses before and after the look-ahead, each (B,) -> w (B,), detached."""
    # ---- EXERCISE npc_weight: l_I, l_T, l_I_after, l_T_after (B,) -> w (B,) ----
    # A step on pair i that raises the loss of its clean memory pairs (a ratio below 1) would harm the model:
    #   r_i = (l^I_i(t) / l^I_i(t+1) + l^T_i(t) / l^T_i(t+1)) / 2      w_i = tanh(r_i) if r_i < 1 else 1
    # (t: under A, before the look-ahead step; t+1: under A', after it)
    r_img = l_I / l_I_after  # (B,) l^I_i(t) / l^I_i(t+1), image-side memory pair
    r_txt = l_T / l_T_after  # (B,) l^T_i(t) / l^T_i(t+1), text-side memory pair
    r = (r_img + r_txt) / 2  # (B,) r_i
    w = torch.where(r < 1, torch.tanh(r), torch.ones_like(r))  # (B,) w_i = tanh(r_i) if r_i < 1 else 1
    # ---- END EXERCISE ----
    return w.detach()


def main():
    args = parser.parse_args()  # with the defaults of the setting --dataset picks, checked (runs.Parser)
    if args.official_loss and args.no_lookahead:
        raise data.UserError("--official-loss and --no-lookahead together train plain InfoNCE: give one")
    method = "npc"
    if args.official_loss:
        method = "npc-official-loss"
    if args.no_lookahead:
        method = "npc-no-lookahead"
    runs.claim_out_dir(args, method)  # refuses a folder holding another run, unless --resume or --overwrite

    # ---- setup
    device = common.setup(args)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")  # fp32 weights
    log = runs.logger(args.out_dir)
    runs.log_flags(log, method, args)
    weights = args.pretrained  # args stay as given: --resume compares them with the checkpoint's
    if args.dataset == "embedded" and weights is None:
        weights = embedded.prepare(args.data_root, device, log)  # the data and the tiny CLIP, on first use

    # ---- data and the pre-trained model
    train, is_noisy = data.noisy_train(args.dataset, args.data_root, args.noise, args.noise_seed)
    dev, test = (data.load_split(args.dataset, args.data_root, s) for s in ("dev", "test"))
    log(f"data: {len(train.paths)} train images, {len(is_noisy)} captions, {is_noisy.mean():.3f} noisy "
        f"(asked {args.noise}); dev {len(dev.paths)}, test {len(test.paths)} images")
    model, preprocess, tokenizer = common.load_model(args.model, weights, device, log)
    cache = None if args.no_image_cache else data.cache_dir(args.data_root)
    pixels = data.Pixels(preprocess, cache, args.workers)
    data.check_splits(pixels, log, train, dev, test)  # every image decodes, no split leaks into another
    evaluate = functools.partial(common.evaluate, pixels=pixels, tokenizer=tokenizer, device=device)

    # ---- the memory bank (from the starting model, also on --resume), and the siamese copy
    rebuild = functools.partial(build_bank, train=train, pixels=pixels, tokenizer=tokenizer, device=device,
                                is_noisy=is_noisy, args=args, log=log)
    bank_img, bank_txt, bank = rebuild(model)
    start_bank = bank  # results.json's: the paper's bank, from the starting model
    pairs = WithMemory(data.Pairs(train, pixels, tokenizer), bank_img, bank_txt)
    loader = runs.loader(pairs, args.batch_size, args.workers, args.seed)
    if len(loader) == 0:
        raise data.UserError(f"{len(is_noisy)} training pairs make no full batch of {args.batch_size}")
    siamese = copy.deepcopy(model).train()
    opt = runs.optimizer(model, args.lr, args.wd)
    siamese_opt = runs.optimizer(siamese, args.lr, args.wd)
    net = model
    siamese_net = siamese
    if common.world() > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
        siamese_net = torch.nn.parallel.DistributedDataParallel(siamese)
    if args.compile:  # the fp32 memory passes stay eager: they call model and siamese directly
        net = torch.compile(net)
        siamese_net = torch.compile(siamese_net)
    total = args.epochs * len(loader)
    start = 0
    history = []
    if args.resume:
        start, history = runs.resume(args, model, opt)
        log(f"resumed from {args.out_dir}/last.pt at epoch {start + 1}; memory bank rebuilt from the start")
    else:
        history.append({"epoch": 0, "dev": evaluate(model, dev)})
        log(f"start: dev {common.fmt(history[0]['dev'])}")

    # ---- training
    for epoch in range(start, args.epochs):
        used, bank_s = "the starting model's", 0.0
        if not args.fixed_bank and epoch > 0:  # a deviation from the paper, whose bank is fixed
            t0 = time.time()
            pairs.bank_img, pairs.bank_txt, bank = rebuild(model)
            bank_s = time.time() - t0
            used = f"rebuilt from the model of epoch {epoch} in {bank_s:.1f}s"
            # a new loader: each worker process holds the copy of `pairs` it got when it started, and the
            # old workers (persistent across epochs) would go on serving the old bank
            loader = runs.loader(pairs, args.batch_size, args.workers, args.seed)
        log(f"epoch {epoch + 1}/{args.epochs}  memory bank: {used}")
        model.train()
        common.start_epoch(loader, args, epoch)
        t0, losses, ws, ks, served = time.time(), [], [], [], []
        for i, (images, tokens, k, images_I, tokens_I, k_I, images_T, tokens_T, k_T) in enumerate(loader):
            lr = runs.set_lr(opt, epoch * len(loader) + i, total, args.warmup, args.lr)
            images = pixels.normalize(images.to(device))  # (B, 3, H, W) the batch
            tokens = tokens.to(device)  # (B, L)
            memory_images = pixels.normalize(torch.cat([images_I, images_T]).to(device))  # (2B, 3, H, W)
            memory_tokens = torch.cat([tokens_I, tokens_T]).to(device)  # (2B, L) image side, then text side
            w = torch.ones(len(images), device=device)  # (B,) --no-lookahead: the memory term alone
            if not args.no_lookahead:
                # the memory losses before the look-ahead, under A (A' equals A until its step), fp32
                l_I, l_T = memory_losses(model, memory_images, memory_tokens)  # (B,) each
                # look-ahead: A' <- A, one step of A' on the batch, then the memory losses again under A'
                copy_into(siamese, siamese_opt, model, opt)
                with amp:
                    lookahead_loss = common.info_nce(*siamese_net(images, tokens)).mean()
                runs.train_step(siamese_net, siamese_opt, lookahead_loss)
                l_I_after, l_T_after = memory_losses(siamese, memory_images, memory_tokens)  # (B,) each
                w = npc_weight(l_I, l_T, l_I_after, l_T_after)  # (B,)
            # the batch and its memory pairs under A, one forward with gradient: l, m_I, m_T (B,) each
            with amp:
                img, txt, scale = net(torch.cat([images, memory_images]), torch.cat([tokens, memory_tokens]))
                l, m_I, m_T = (common.info_nce(a, b, scale) for a, b in zip(img.chunk(3), txt.chunk(3)))
            if args.official_loss:  # one weight scale per batch; the memory term a constant
                loss = w.mean() * l.mean() + (m_I + m_T).mean().detach()
            else:  # L = mean_i w_i l_i + mean_i (m_I_i + m_T_i)
                loss = (w * l).mean() + (m_I + m_T).mean()
            runs.train_step(net, opt, loss)
            losses.append(loss.item())
            ws.append(common.gather(w))
            ks.append(common.gather(k.to(device)))
            served.append(common.gather(torch.stack([k_I, k_T], 1).to(device)))  # (B, 2) its memory pairs
        train_s = time.time() - t0
        w = torch.cat(ws).cpu().numpy()  # (pairs trained on this epoch,) NPC's weight of each
        trained = torch.cat(ks).cpu().numpy()  # (pairs trained on,)
        noisy = is_noisy[trained]  # which of them were noisy
        memory = torch.cat(served).cpu().numpy()  # (pairs trained on, 2) the memory pairs served with them
        in_bank = memory == np.stack([pairs.bank_img[trained], pairs.bank_txt[trained]], 1)
        stats = {"loss": common.global_mean(losses), "w_mean": float(w.mean()), "w_std": float(w.std()),
                 "w_clean": float(w[~noisy].mean()) if (~noisy).any() else None,
                 "w_noisy": float(w[noisy].mean()) if noisy.any() else None,
                 "w_below_1": float((w < 1).mean()), "pairs": len(w), "noisy_pairs": int(noisy.sum()),
                 "memory_noisy": float(is_noisy[memory].mean()), "memory_from_bank": float(in_bank.mean())}
        dev_r = evaluate(model, dev)
        history.append({"epoch": epoch + 1, **stats, "time_s": train_s, "bank_s": bank_s, "dev": dev_r,
                        "memory_bank": bank})
        log(f"epoch {epoch + 1}/{args.epochs}  loss {stats['loss']:.4f}  w {stats['w_mean']:.3f} "
            f"sd {stats['w_std']:.3f} (clean {stats['w_clean'] or float('nan'):.3f}, "
            f"noisy {stats['w_noisy'] or float('nan'):.3f}, {stats['w_below_1']:.0%} below 1)  lr {lr:.2e}")
        log(f"epoch {epoch + 1}/{args.epochs}  train {train_s:5.1f}s  dev {common.fmt(dev_r)}")
        runs.save_epoch(args, method, model, opt, history)

    # ---- test with the best dev checkpoint
    extra = {"noise_rate": float(is_noisy.mean()), "memory_bank": start_bank}
    runs.finish(args, method, model, evaluate, test, history, extra=extra)


if __name__ == "__main__":
    runs.run(main)
