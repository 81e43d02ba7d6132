"""SDD: Self-Drop and Dual-Weight for noisy correspondence (Liu et al., arXiv 2412.06172), built on NPC's
look-ahead.

Every epoch the current model scores every training pair. Pairs scoring at or below alpha are dropped for the
epoch (self-drop); a GMM on the scores gives every pair a confidence weight w_con. Each step, a siamese copy
takes one look-ahead step on the batch weighted by w_con; a pair whose step raises the loss of its clean
memory pairs gets a significance weight w_sig < 1 (NPC's weight). The model trains on the kept pairs with the
dual weight w_sig * w_con.

    python sdd.py                        # embedded data, tiny CLIP, CPU
    python sdd.py --noise 0.8
    python sdd.py --plot                 # similarity histograms per epoch (needs matplotlib)
    python sdd.py --dataset f30k --data-root /data/f30k --noise 0.4   # ViT-B-32 'openai' on a GPU
    torchrun --standalone --nproc_per_node=4 sdd.py --dataset coco --data-root /data/coco

The four partitions of the paper, and where they arise here:
    noisy                     S_i <= alpha: dropped from this epoch's D_p (it may come back next epoch)
    vague                     kept, w_con_i < 0.5: trained on, down-weighted by the GMM's doubt
    clean yet insignificant   kept, w_con_i >= 0.5, w_sig_i < 1: its look-ahead would hurt its neighbours
    clean and significant     kept, w_con_i >= 0.5, w_sig_i = 1: trained on at full weight
(The 0.5 cut only names the partitions in the log; the method itself uses the continuous weights.)

Paper -> code:
    S_i = s cos(f_I, f_T)      S (N,) each epoch, the pair's cosine (the official alpha 20 is 0.20 at s = 100)
    D_p                        keep (N,) bool, S_i > alpha
    w_con_i                    w_con_all (N,): GMM(2, max_iter 10) on S, high-mean posterior, min-max scaled;
                               w_con (B,) of the batch
    memory bank                bank_img, bank_txt (N,): NPC's neighbours, pool = starting pairs with S > beta
    w_sig_i                    w_sig (B,) = tanh(r_i) if r_i < 1 else 1, r from the memory losses before and
                               after A' stepped on mean(w_con * l)
    L = mean_i w_sig_i w_con_i l_i    loss, over a batch of D_p; no memory term (as the official
                               main_SDD_sim.py:232, whose per-pair losses carry w_con from :200-201)

Thresholds. The official alpha = 0.20 and beta = 0.30 (cosine) fit OpenAI's CLIP, whose matched pairs score a
cosine near 0.3 with a spread of a few hundredths, so 0.20 and 0.30 sit near mu - 3 sd and mu of its matched
pairs. They are the real-data defaults. The embedded tiny CLIP scores matched pairs near 0.71 (sd 0.10), so
`auto` (its default) reads the same two points off the starting model: alpha = mu - 3 sd and beta = mu of its
cosines on the clean dev split's pairs. Like the official constants, they belong to the model, not to the
noise: a GMM on the noisy training pairs also finds them at noise 0.4 (0.414, 0.711) but not at 0.8, where the
matched pairs are too few.

Deviations from the official code (github.com/DongChenwei2000/SDD), and why:
  - the text-side memory pair is looked up by the pair's original index (the official data.py:376 uses its
    position in D_p).
  - the look-ahead as in npc.py: one backward (the official main_SDD_sim.py:209-210 calls it twice), A's
    AdamW moments copied in place, the memory losses before and after it in fp32 without gradient (bf16
    rounding is as large as one step's effect).
  - the GMM sees the cosines min-max scaled to [0, 1] (common.gmm_clean_prob); the official one sees raw
    logits (get_memorybank.py:121-124). The fit is the same up to reg_covar, then relative to the range of S.
  - w_con comes from a GMM on S of all N pairs, min-max scaled over all N, as in the official code
    (get_memorybank.py:129); the paper's figure fits it on the partial set D_p.
  - the schedule runs over epochs of D_p (warm-up and cosine in fractions of an epoch), so it ends at 0
    whatever the number of dropped pairs; the official one counts full-set samples (main_SDD_sim.py:85, :150)
    and so never finishes its decay.
  - lr and model selection as baseline.py (lr 1e-5 on real data, not 2e-7 as README.md:13; see its
    docstring); no weight decay on biases, gains and logit_scale, and the logit scale clamped to ln 100 after
    each step, as open_clip's training code (runs.optimizer, runs.train_step); the official AdamW decays
    every parameter (main_SDD_sim.py:87) and never clamps.
Infrastructure as npc.py (--compile: A and A', not the fp32 memory passes). The memory bank, the memory-pair
dataset and the look-ahead copy are NPC's, written out again below so that this file reads alone.
Defaults: those of baseline.py (embedded: batch 128, lr 5e-4, 50 warm-up steps, 3 epochs). There the drop is
sharp (at noise 0.4 it removes about 7,300 pairs an epoch, 98-100% of them noisy) and SDD reaches test rSum
262.4 at noise 0.4 and 241.6 at 0.8, against 237.3 and 181.3 for baseline.py (the README has the table).
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
EMBEDDED = {  # the generated data and the tiny CLIP on 2 CPU cores, as baseline.py; thresholds read off it
    "data_root": "data/embedded", "model": "nc-tiny", "pretrained": None, "noise": 0.4,
    "epochs": 3, "batch_size": 128, "lr": 5e-4, "warmup": 50, "workers": 0, "alpha": "auto", "beta": "auto",
}
REAL = {  # Flickr30K, MS-COCO, CC120K on a GPU: the official settings and thresholds, except the lr
    "data_root": None, "model": "ViT-B-32", "pretrained": "openai", "noise": 0.4,
    "epochs": 5, "batch_size": 256, "lr": 1e-5, "warmup": 500, "workers": 8, "alpha": "0.20", "beta": "0.30",
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
parser.add_argument("--alpha", help="self-drop at S <= alpha: a cosine, or auto (dev mu - 3 sd)")
parser.add_argument("--beta", help="memory bank: starting pairs with S > beta; a cosine, or auto (dev mu)")
parser.add_argument("--no-image-cache", action="store_true", help="decode every image with PIL each time")
parser.add_argument("--precision", choices=("bf16", "fp32"), help="autocast of forwards (CUDA default: bf16)")
parser.add_argument("--compile", action="store_true", help="torch.compile the training passes of A and A'")
parser.add_argument("--plot", action="store_true", help="histograms of S each epoch, PNG (needs matplotlib)")


# ---- the thresholds and the per-epoch partition
def pair_similarities(model, split, pixels, tokenizer, device):
    """S: cos(f_I, f_T) of every pair of split under the model, and the features. -> S (N,) numpy,
    img (n_img, D), txt (N, D)."""
    img, txt = common.features(model, split, pixels, tokenizer, device)
    owner = torch.as_tensor(split.img_of_cap, device=img.device)  # (N,) the image of each pair
    return (img[owner] * txt).sum(1).cpu().numpy(), img, txt


def auto_thresholds(S_dev):
    """alpha = mu - 3 sd and beta = mu of the starting model's S on matched pairs, read on the clean dev
    split."""
    return float(S_dev.mean() - 3 * S_dev.std()), float(S_dev.mean())


def threshold(name, value, auto):
    """A threshold flag's value: a number, or auto (the value the rule above reads off the starting model)."""
    if value == "auto":
        return auto
    try:
        return float(value)
    except ValueError:
        raise data.UserError(f"--{name} must be a number or auto, got {value}") from None


def self_drop(S, alpha):
    """SDD's per-epoch partition from the similarities S (N,) of every pair -> keep (N,) bool, w_con (N,)."""
    # ---- EXERCISE self_drop: S (N,), alpha -> keep (N,), w_con (N,) ----
    # Self-drop: a pair at or below alpha is taken for noisy and leaves this epoch's partial set D_p:
    #   keep_i = S_i > alpha
    # Confidence: the posterior of the high-similarity GMM component over all pairs (common.gmm_clean_prob,
    # official max_iter 10), min-max scaled so that the surest pair weighs 1 and the least sure 0:
    #   w_con_i = (p_i - min_j p_j) / (max_j p_j - min_j p_j)
    keep = S > alpha  # (N,) D_p
    p_clean = common.gmm_clean_prob(S, higher_is_clean=True, max_iter=10)  # (N,)
    w_con = (p_clean - p_clean.min()) / max(p_clean.max() - p_clean.min(), 1e-12)  # (N,)
    # ---- END EXERCISE ----
    return keep, w_con


# ---- the memory bank and the look-ahead copy: NPC's, written out again so that this file reads alone
def nearest(queries, keys, chunk=2048):
    """Index of the key with the highest dot product, for each query: (Q, D), (K, D) -> (Q,) numpy, in chunks
    of queries shared among the processes under DDP."""
    return common.chunked(lambda lo, hi: (queries[lo:hi] @ keys.T).argmax(1), len(queries), chunk).numpy()


def neighbours(img, txt, owner, pool):
    """For every pair k: bank_img[k], the pool pair whose image is nearest to k's image, and bank_txt[k], the
    pool pair whose caption is nearest to k's caption (cosine; a pool pair is its own text-side neighbour).
    img (n_img, D), txt (N, D) normalised, owner (N,) image of each pair, pool (P,) pair indices
    -> bank_img, bank_txt (N,)."""
    # ---- EXERCISE neighbours: img, txt, owner, pool (P,) -> bank_img, bank_txt (N,) pair indices ----
    # For every pair k, the pool pair nearest to it on each side (normalised features: cosine = dot product;
    # nearest(queries, keys) gives each query's argmax over the keys):
    #   bank_img[k] = argmax_{c in P} img[owner[k]] . img[owner[c]]
    #   bank_txt[k] = argmax_{c in P} txt[k] . txt[c]
    p = torch.as_tensor(pool, device=img.device)  # (P,)
    nearest_image = nearest(img, img[owner[p]])  # (n_img,) index into pool of the nearest pool image
    bank_img = pool[nearest_image[owner.cpu().numpy()]]  # (N,) each pair takes its image's
    bank_txt = pool[nearest(txt, txt[p])]  # (N,)
    # ---- END EXERCISE ----
    return bank_img, bank_txt


class WithMemory(torch.utils.data.Dataset):
    """Pair k -> (image, tokens, k) of pair k, then of its memory pairs bank_img[k] and bank_txt[k]."""

    def __init__(self, pairs, bank_img, bank_txt):
        self.pairs, self.bank_img, self.bank_txt = pairs, bank_img, bank_txt

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        return (*self.pairs[k], *self.pairs[self.bank_img[k]], *self.pairs[self.bank_txt[k]])


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


def memory_losses(model, images, tokens):
    """l_I, l_T (B,): InfoNCE among the B image-side and among the B text-side memory pairs, images and tokens
    (2B, ...) in that order; in fp32 and without gradient, whatever the autocast around it."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        img, txt, scale = model(images, tokens)  # (2B, D), (2B, D), ()
        l_I, l_T = (common.info_nce(a, b, scale) for a, b in zip(img.chunk(2), txt.chunk(2)))
    return l_I, l_T


# ---- the dual weight
def dual_weight(w_con, l_I, l_T, l_I_after, l_T_after):
    """SDD's per-step weight: w_con (B,) and the memory losses before and after the look-ahead (B,)
    -> w_sig (B,), w (B,), detached."""
    # ---- EXERCISE dual_weight: w_con, l_I, l_T, l_I_after, l_T_after (B,) -> w_sig (B,), w (B,) ----
    # Significance, as NPC: does a step on pair i lower (r > 1) or raise (r < 1) the loss of its memory pairs?
    #   r_i = (l^I_i(t) / l^I_i(t+1) + l^T_i(t) / l^T_i(t+1)) / 2      w_sig_i = tanh(r_i) if r_i < 1 else 1
    # The dual weight, how sure the pair is clean times how much it helps:  w_i = w_sig_i * w_con_i
    r = (l_I / l_I_after + l_T / l_T_after) / 2  # (B,) r_i
    w_sig = torch.where(r < 1, torch.tanh(r), torch.ones_like(r))  # (B,)
    w = w_sig * w_con  # (B,)
    # ---- END EXERCISE ----
    return w_sig.detach(), w.detach()


def plot(path, S, is_noisy, alpha, title):
    """Histograms of the pairs' S, clean and noisy apart, with the GMM(2) that self_drop fitted on them and
    alpha (the paper's Figure 5)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gmm = common.gmm_fit(S, max_iter=10)[0]  # the GMM self_drop fits, on S scaled to [0, 1]
    low, span = S.min(), max(S.max() - S.min(), 1e-12)
    x = np.linspace(S.min(), S.max(), 400)
    density = np.exp(gmm.score_samples(((x - low) / span).reshape(-1, 1))) / span  # (400,) on the cosine axis
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([S[~is_noisy], S[is_noisy]], bins=80, density=True, histtype="stepfilled", alpha=0.5,
            label=["clean", "noisy"])
    ax.plot(x, density, "k", lw=1, label="the method's GMM")
    ax.axvline(alpha, color="r", ls="--", lw=1, label="alpha (self-drop)")
    ax.set(xlabel="cosine of the pair", ylabel="density", title=title)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def partition_figures(keep, w_con_all, is_noisy):
    """How the epoch's drop and confidence weight fare against the true mask (for the log and
    results.json)."""
    drop = ~keep
    has_both = 0 < is_noisy.mean() < 1
    return {"dropped": int(drop.sum()),
            "drop_precision": float(is_noisy[drop].mean()) if drop.any() else None,
            "drop_recall": float(drop[is_noisy].mean()) if is_noisy.any() else None,
            "w_con_auc": float(roc_auc_score(~is_noisy, w_con_all)) if has_both else None}


def main():
    args = parser.parse_args()  # with the defaults of the setting --dataset picks, checked (runs.Parser)
    numbers = [threshold(f, getattr(args, f), None) for f in ("alpha", "beta")]  # None: auto
    if None not in numbers and numbers[0] > numbers[1]:  # the bank would hold pairs the drop removes
        raise data.UserError(f"--alpha {numbers[0]:g} is above --beta {numbers[1]:g}: the memory bank "
                             "(S > beta) would hold pairs the self-drop (S <= alpha) removes: give "
                             "alpha <= beta")
    runs.claim_out_dir(args, "sdd")  # refuses a folder holding another run, unless --resume or --overwrite
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise data.UserError("--plot needs matplotlib (pip install matplotlib)") from None

    # ---- setup
    device = common.setup(args)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")  # fp32 weights
    log = runs.logger(args.out_dir)
    runs.log_flags(log, "sdd", args)
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

    # ---- thresholds and the memory bank, from the starting model (also on --resume)
    S, img, txt = pair_similarities(model, train, pixels, tokenizer, device)  # S (N,)
    auto_alpha, auto_beta = auto_thresholds(pair_similarities(model, dev, pixels, tokenizer, device)[0])
    alpha = threshold("alpha", args.alpha, auto_alpha)
    beta = threshold("beta", args.beta, auto_beta)
    pool = np.flatnonzero(S > beta)
    if len(pool) == 0:
        raise data.UserError(f"the memory bank is empty: no starting pair has S > beta = {beta:.3f}")
    bank_img, bank_txt = neighbours(img, txt, torch.as_tensor(train.img_of_cap, device=img.device), pool)
    noisy_memory = np.mean(is_noisy[np.concatenate([bank_img, bank_txt])])
    log(f"thresholds: alpha {alpha:.3f} (drop), beta {beta:.3f} (bank); auto would give {auto_alpha:.3f}, "
        f"{auto_beta:.3f}")
    log(f"memory bank: pool {len(pool)} pairs, {is_noisy[pool].mean():.1%} noisy; "
        f"{noisy_memory:.1%} of the memory pairs noisy")
    pairs = WithMemory(data.Pairs(train, pixels, tokenizer), bank_img, bank_txt)

    # ---- optimisers, DDP, resume
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
    epoch_steps = len(is_noisy) // args.batch_size  # steps in an epoch of the full set: the schedule's unit
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
        # the epoch's partition, from the current model
        if epoch > 0:
            S = pair_similarities(model, train, pixels, tokenizer, device)[0]  # (N,)
        keep, w_con_all = self_drop(S, alpha)  # (N,), (N,)
        figures = partition_figures(keep, w_con_all, is_noisy)
        if args.plot and common.rank() == 0:
            path = f"{args.out_dir}/similarity_epoch{epoch + 1}.png"
            plot(path, S, is_noisy, alpha, f"before epoch {epoch + 1}")
        kept = torch.utils.data.Subset(pairs, np.flatnonzero(keep).tolist())  # D_p
        # a new loader each epoch: its worker processes copy this epoch's D_p when they start
        loader = runs.loader(kept, args.batch_size, args.workers, args.seed)
        if len(loader) == 0:
            raise data.UserError(f"{int(keep.sum())} kept pairs make no full batch of {args.batch_size}")
        model.train()
        common.start_epoch(loader, args, epoch)
        t0, losses, w_sigs, ks = time.time(), [], [], []
        for i, (images, tokens, k, images_I, tokens_I, _, images_T, tokens_T, _) in enumerate(loader):
            step = int((epoch + i / len(loader)) * epoch_steps)  # the schedule in fractions of epochs of D_p
            lr = runs.set_lr(opt, step, args.epochs * epoch_steps, args.warmup, args.lr)
            images = pixels.normalize(images.to(device))  # (B, 3, H, W) the batch
            tokens = tokens.to(device)  # (B, L)
            memory_images = pixels.normalize(torch.cat([images_I, images_T]).to(device))  # (2B, 3, H, W)
            memory_tokens = torch.cat([tokens_I, tokens_T]).to(device)  # (2B, L) image side, then text side
            w_con = torch.as_tensor(w_con_all[k.numpy()], dtype=torch.float32, device=device)  # (B,)
            # the memory losses before the look-ahead, under A (A' equals A until its step), fp32
            l_I, l_T = memory_losses(model, memory_images, memory_tokens)  # (B,) each
            # look-ahead: A' <- A, one step of A' on mean(w_con * l), the memory losses again under A'
            copy_into(siamese, siamese_opt, model, opt)
            with amp:
                lookahead_loss = (w_con * common.info_nce(*siamese_net(images, tokens))).mean()
            runs.train_step(siamese_net, siamese_opt, lookahead_loss)
            l_I_after, l_T_after = memory_losses(siamese, memory_images, memory_tokens)  # (B,) each
            w_sig, w = dual_weight(w_con, l_I, l_T, l_I_after, l_T_after)  # (B,), (B,)
            with amp:  # L = mean_i w_sig_i w_con_i l_i
                loss = (w * common.info_nce(*net(images, tokens))).mean()
            runs.train_step(net, opt, loss)
            losses.append(loss.item())
            w_sigs.append(common.gather(w_sig))
            ks.append(common.gather(k.to(device)))
        train_s = time.time() - t0
        w_sig = torch.cat(w_sigs).cpu().numpy()  # (pairs trained on this epoch,)
        sure = w_con_all[torch.cat(ks).cpu().numpy()] >= 0.5  # (pairs trained on,) w_con_i >= 0.5
        parts = {"noisy": int((~keep).sum()), "vague": int((~sure).sum()),
                 "clean_insignificant": int((sure & (w_sig < 1)).sum()),
                 "clean_significant": int((sure & (w_sig == 1)).sum())}
        dev_r = evaluate(model, dev)
        loss = common.global_mean(losses)  # the epoch's mean over every process
        history.append({"epoch": epoch + 1, "loss": loss, **figures, "partitions": parts,
                        "w_sig_mean": float(w_sig.mean()), "time_s": train_s, "dev": dev_r})
        log(f"epoch {epoch + 1}/{args.epochs}  dropped {parts['noisy']} (precision "
            f"{figures['drop_precision'] or 0:.3f} recall {figures['drop_recall'] or 0:.3f})  vague "
            f"{parts['vague']}  clean-insignificant {parts['clean_insignificant']}  clean-significant "
            f"{parts['clean_significant']}")
        log(f"epoch {epoch + 1}/{args.epochs}  AUC(w_con) {figures['w_con_auc'] or float('nan'):.3f}  "
            f"w_sig {w_sig.mean():.3f}  loss {loss:.4f}  lr {lr:.2e}")
        log(f"epoch {epoch + 1}/{args.epochs}  train {train_s:5.1f}s  dev {common.fmt(dev_r)}")
        runs.save_epoch(args, "sdd", model, opt, history)

    # ---- test with the best dev checkpoint
    extra = {"noise_rate": float(is_noisy.mean()), "alpha": alpha, "beta": beta, "bank_pool": len(pool)}
    runs.finish(args, "sdd", model, evaluate, test, history, extra=extra)


if __name__ == "__main__":
    runs.run(main)
