"""NLIP: Noise-robust Language-Image Pre-training (Huang et al., AAAI 2023, arXiv 2212.07086): noise
harmonization and noise completion, for pre-training a CLIP (from scratch, or continued) on noisy pairs.

Noise harmonization: after a warm-up with the plain contrastive loss, a GMM on every pair's InfoNCE loss gives
each pair a noise probability eps_i each epoch (noisy pairs are learnt late: the memorization effect), and the
contrastive loss lets likely-noisy pairs settle at a lower similarity. Noise completion: a captioning decoder,
cross-attending to the image tower's patch tokens and prompted with the image's top-k "concepts" (caption
words retrieved by CLIP similarity), writes captions that replace likely-noisy ones. Loss: L_NITC + 2 L_LM.

    python nlip.py                         # embedded data: nc-tiny from scratch on the noisy train split, CPU
    python nlip.py --lam 0 --lm-weight 0   # the same run as plain contrastive pre-training (the reference)
    python nlip.py --dataset cc120k --data-root /data/cc120k --epochs 30      # ViT-B-32 from scratch, a GPU
    torchrun --standalone --nproc_per_node=8 nlip.py --dataset cc120k --data-root /data/cc120k --pretrained
    openai

Paper -> code:
    eps_i, noise probability   eps (N,)     1 - the GMM clean posterior of the pair's loss, each epoch
    omega_i = lambda eps_i     omega (B,)   in harmonized_loss, whether the pair's caption is raw or synthetic
    L_NITC, L_LM               nitc, lm (B,) the latter: mean cross-entropy over the caption's words only
    concepts, the decoder      concepts (n_img, k) word ids; Captioner: [concepts, <bos>, words] -> next word
    completion                 synthetic (N,) bool: the pair trains on its image's generated caption

The harmonized loss (NLIP leaves its form open): a margin omega_i, in cosine, added to pair i's positive
logit, l_i = (CE(s f_I_i.f_T_j + s' omega_i [j = i])_j, i) + the same for text-to-image) / 2, where s' is the
temperature s without its gradient. eps = 0 gives InfoNCE; a pair with a larger eps_i meets its loss at a
similarity omega_i lower, so it settles lower, and its row stops pushing the negatives away once met. With
s' = s (--learned-margin, this file's earlier form) the margin also trains s: it adds s omega_i (p_ii - 1),
never positive, to each direction's gradient on log s, so every pair with a margin pushes s up, and a larger
s turns the margin into a larger logit bonus, until likely-noisy rows stop training (a soft drop). With s'
the temperature learns as under InfoNCE.
Noise-scaled soft targets (q_ij = (1 - omega_i) [j = i] + omega_i / n), the other common form, did worse here
(README): their optimum for a noisy pair is a row of equal similarities, which pulls its image towards every
caption of the batch.
The completion rule: a pair with eps_i > --replace-above trains on its image's generated caption, any other
pair does so with probability eps_i (drawn anew each epoch). The pair keeps its omega_i: trusting the
synthetic caption fully (omega = 0) cost rSum here (README), since the tiny model's captions share its blind
spots.

Choices where the paper is silent, and why:
  - the decoder is a separate module (torch's TransformerDecoder) over a word vocabulary of the training
    captions; the contrastive text features come from CLIP's own text tower, which never sees image tokens.
  - L_LM is weighted by 1 - eps_i, so the decoder learns to caption from the pairs the GMM believes are clean.
  - concepts: the caption words outside a short stopword list seen --min-count times; an image's top-k by
    cosine between its CLIP embedding and the word's CLIP text embedding, under the current model, each epoch.
  - the GMM of each epoch uses the raw captions, in seeded random batches (as npc.py). No MAE branch.
  - AdamW without weight decay on biases, gains and logit_scale, and the logit scale clamped to ln 100 after
    each step, as open_clip's training code (runs.optimizer, runs.train_step); NLIP has no public code.
Infrastructure as baseline.py; --compile compiles CLIP and the decoder in training. Generation stays eager (a
new shape every word); under torchrun each process writes every W-th batch. The defaults (the dicts below)
pre-train from scratch; the embedded ones are those of the tiny CLIP's pre-training in embedded.py.
"""
import functools
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.utils.data import Subset

import captions
import common
import data
import embedded
import runs

# ---- defaults of the two settings: --dataset embedded takes the first, any other dataset the second
EMBEDDED = {  # nc-tiny pre-trained from scratch on the generated data, 2 CPU cores (as embedded.py's)
    "data_root": "data/embedded", "model": "nc-tiny", "pretrained": "none", "noise": 0.4,
    "epochs": 6, "batch_size": 128, "lr": 1e-3, "wd": 0.1, "warmup": 100, "workers": 0,
}
REAL = {  # ViT-B-32 from scratch on CC120K (or another dataset) on GPUs, with CLIP's weight decay
    "data_root": None, "model": "ViT-B-32", "pretrained": "none", "noise": 0.4,
    "epochs": 5, "batch_size": 256, "lr": 5e-4, "wd": 0.2, "warmup": 500, "workers": 8,
}

# ---- flags (-h shows every default; None here: the setting's value, from the dicts above)
parser = runs.Parser(__doc__, EMBEDDED, REAL)
parser.add_argument("--dataset", default="embedded", choices=data.DATASETS, help="the data")
parser.add_argument("--data-root", help="dataset folder (embedded: generated on first use)")
parser.add_argument("--noise", type=float, help="share of training captions shuffled, in [0, 1)")
parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise permutation")
parser.add_argument("--model", help="open_clip model name, a ViT (nc-tiny: the embedded CPU model)")
parser.add_argument("--pretrained", help="none (from scratch), open_clip tag or weights file (continued)")
parser.add_argument("--epochs", type=int, help="training epochs")
parser.add_argument("--batch-size", type=int, help="pairs per optimiser step, over all processes")
parser.add_argument("--lr", type=float, help="peak learning rate of AdamW")
parser.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay")
parser.add_argument("--wd", type=float, help="AdamW weight decay")
parser.add_argument("--seed", type=int, default=99, help="training seed")
parser.add_argument("--workers", type=int, help="DataLoader worker processes (at most the cores)")
parser.add_argument("--out-dir", help="log, checkpoints, results (default: out/<method>-<dataset>-n<noise>)")
parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if there is a GPU)")
parser.add_argument("--resume", action="store_true", help="continue the run in out-dir from its last.pt")
parser.add_argument("--overwrite", action="store_true", help="delete the run already in out-dir, start again")
parser.add_argument("--no-image-cache", action="store_true", help="decode every image with PIL each time")
parser.add_argument("--precision", choices=("bf16", "fp32"), help="autocast of forwards (CUDA default: bf16)")
parser.add_argument("--compile", action="store_true", help="torch.compile training (CLIP and the decoder)")
parser.add_argument("--lam", type=float, default=1.0, help="lambda in omega_i = lambda eps_i, in [0, 1]")
parser.add_argument("--synthetic-lam", type=float,
                    help="lambda of a pair on a generated caption, in [0, 1] (default: --lam)")
parser.add_argument("--learned-margin", action="store_true", help="the logit margin s omega_i also trains s")
parser.add_argument("--lm-weight", type=float, default=2.0, help="L = L_NITC + this L_LM (CoCa); 0: none")
parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs of plain InfoNCE before eps is used")
parser.add_argument("--replace-above", type=float, default=0.5, help="replace a caption with eps above it")
parser.add_argument("--concepts", type=int, default=5, help="top-k concepts prompted for each image")
parser.add_argument("--min-count", type=int, default=5, help="rarer words are <unk> (and not concepts)")
parser.add_argument("--max-words", type=int, default=30, help="caption length the decoder reads and writes")
parser.add_argument("--dec-layers", type=int, default=2, help="decoder layers (width: the text tower's)")
parser.add_argument("--beam", type=int, default=1, help="beam size of generation (1: greedy)")

STOPWORDS = {"a", "an", "the", "of", "in", "on", "at", "and", "with", "to", "is", "are", "there", "this",
             "that", "it", "its", "some"}


EPS_FLAGS = ("--lam", "--synthetic-lam", "--replace-above", "--learned-margin")  # each acts through eps


def check_flags(args):
    """NLIP's own flags, each in its range (one line, exit 2)."""
    args.synthetic_lam = args.lam if args.synthetic_lam is None else args.synthetic_lam
    ranges = {"lam": (0, 1), "synthetic_lam": (0, 1), "replace_above": (0, 1), "lm_weight": (0, np.inf),
              "warmup_epochs": (0, np.inf), "concepts": (1, np.inf), "min_count": (1, np.inf),
              "beam": (1, np.inf), "dec_layers": (1, np.inf), "max_words": (2, np.inf)}
    for flag, (low, high) in ranges.items():
        value = getattr(args, flag)
        if not low <= value <= high:
            allowed = f"in [{low}, {high}]" if high < np.inf else f">= {low}"
            raise data.UserError(f"--{flag.replace('_', '-')} must be {allowed}, got {value}")
    given = [a.split("=")[0] for a in sys.argv[1:] if a.split("=")[0] in EPS_FLAGS]
    if given and args.epochs <= args.warmup_epochs:
        raise data.UserError(f"{given[0]} does nothing here: eps is first used after --warmup-epochs "
                             f"{args.warmup_epochs}, and --epochs is {args.epochs}; train longer or drop it")


# ---- the decoder
class Captioner(torch.nn.Module):
    """The concept-conditioned decoder: causal self-attention over [concepts, <bos>, words], cross-attention
    to the image's patch tokens. ids (B, L), patches (B, P, image width) -> next-word logits (B, L, V)."""

    def __init__(self, vocab_size, width, layers, image_width, length):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.pos = torch.nn.Parameter(0.01 * torch.randn(length, width))
        self.image_proj = torch.nn.Linear(image_width, width)
        layer = torch.nn.TransformerDecoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0,
                                                 activation="gelu", batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerDecoder(layer, layers)
        self.ln = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab_size)

    def forward(self, ids, patches):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.pos[:ids.shape[1]]
        x = self.blocks(x, self.image_proj(patches), tgt_mask=causal, tgt_is_causal=True)
        return self.head(self.ln(x))


class NLIP(torch.nn.Module):
    """CLIP and the decoder, one module (one DDP wrapper). -> image and text features (B, D), scale, L_LM
    (B,)."""

    def __init__(self, clip, captioner):
        super().__init__()
        self.clip, self.captioner = clip, captioner

    @property
    def logit_scale(self):  # common.train_step clamps it
        return self.clip.logit_scale

    def patches(self, images):  # -> pooled image embedding (B, D), patch tokens (B, P, width), normalised
        out = self.clip.visual.forward_intermediates(images, indices=1, normalize_intermediates=True,
                                                     output_fmt="NLC")
        return out["image_features"], out["image_intermediates"][-1]

    def forward(self, images, tokens, dec_in, dec_target):
        img, patches = self.patches(images)
        txt = self.clip.encode_text(tokens, normalize=True)  # the text tower: no image token reaches L_NITC
        lm = torch.zeros(len(img), device=img.device)
        if self.captioner is not None:
            logits = self.captioner(dec_in, patches)  # (B, L, V)
            lm = F.cross_entropy(logits.transpose(1, 2), dec_target, reduction="none")  # (B, L)
            lm = lm.sum(1) / (dec_target >= 0).sum(1).clamp(min=1)  # (B,) mean over the caption's words
        return F.normalize(img, dim=-1), txt, self.clip.logit_scale.exp(), lm


# ---- the two schemes
def harmonized_loss(img, txt, scale, eps, lam, learned_margin=False):
    """L_NITC per sample: img, txt (B, D) normalised, scale () a tensor, eps (B,) noise probabilities, lam a
    float or (B,) -> (B,). eps = 0 is InfoNCE. Under DDP the columns are the gathered global batch, as in
    common.info_nce. learned_margin: the earlier form, whose margin also trains the temperature."""
    all_img, all_txt = common.gather(img), common.gather(txt)  # (n, D), n = W*B columns
    offset = common.rank() * len(img)
    # ---- EXERCISE harmonized_loss: img, txt, all_img, all_txt, offset, scale, eps, lam -> loss ----
    # img, txt (B, D), all_img, all_txt (n, D), scale (), eps (B,), lam a float or (B,) -> loss (B,).
    # NLIP: omega_i = lambda eps_i, a margin (in cosine) granted to pair i's positive, column p = offset + i:
    # the likelier a pair is noise, the lower the similarity it settles at. s' is s without its gradient: the
    # margin moves the logits, not the temperature (learned_margin: s' = s).
    #   l_i = (-log softmax_j(s img_i . all_txt_j + s' omega_i [j = p])[p]
    #          - log softmax_j(s txt_i . all_img_j + s' omega_i [j = p])[p]) / 2
    omega = lam * eps  # (B,)
    rows = torch.arange(len(img), device=img.device)
    labels = rows + offset  # (B,) the positive's column
    margin = torch.zeros(len(img), len(all_txt), device=img.device)
    margin[rows, labels] = omega  # (B, n) omega_i on the positive, 0 elsewhere
    s_margin = scale if learned_margin else scale.detach()  # () s'
    l_i2t = F.cross_entropy(scale * img @ all_txt.T + s_margin * margin, labels, reduction="none")  # (B,)
    l_t2i = F.cross_entropy(scale * txt @ all_img.T + s_margin * margin, labels, reduction="none")  # (B,)
    loss = (l_i2t + l_t2i) / 2  # (B,)
    # ---- END EXERCISE ----
    return loss


def complete(eps, threshold, rng):
    """Which pairs train on their image's generated caption this epoch: eps (N,) -> synthetic (N,) bool."""
    # ---- EXERCISE complete: eps (N,), threshold, rng -> synthetic (N,) bool ----
    # NLIP's noise completion: replace a caption that is likely noise; mix raw and synthetic for the rest, a
    # pair taking the synthetic caption with probability eps_i (drawn anew each epoch, from rng alone):
    #   synthetic_i = eps_i > threshold  or  u_i < eps_i,   u_i ~ U[0, 1)
    replace = eps > threshold  # (N,)
    mix = rng.random(len(eps)) < eps  # (N,)
    synthetic = replace | mix  # (N,)
    # ---- END EXERCISE ----
    return synthetic


# ---- eps, concepts and captions from the current model
@torch.no_grad()
def noise_probability(img, txt, owner, scale, batch_size, seed):
    """eps (N,): 1 - the GMM clean posterior of each pair's InfoNCE, the pairs' raw captions in seeded random
    batches (as npc.py). img (n_img, D), txt (N, D) normalised, owner (N,) the image of each pair."""
    # ---- EXERCISE noise_probability: img, txt, owner, scale, batch_size, seed -> eps (N,) ----
    # The memorization effect: a noisy pair is learnt late, so after a warm-up it has the higher InfoNCE loss.
    #   l_k = InfoNCE of pair k, its image img[owner[k]] and its caption txt[k], in seeded random batches
    #         of batch_size (common.pair_losses);   eps_k = 1 - p_clean(l_k), by common.gmm_clean_prob
    loss = common.pair_losses(img[owner], txt, scale, batch_size, seed)  # (N,) l_k
    eps = 1 - common.gmm_clean_prob(loss)  # (N,)
    # ---- END EXERCISE ----
    return eps


@torch.no_grad()
def top_concepts(clip, img, concept_ids, concept_tokens, k):
    """img (n, D) normalised image embeddings -> (n, k) word ids of the k concepts whose text embedding (of
    concept_tokens, one row per id of concept_ids) is nearest."""
    words = clip.encode_text(concept_tokens.to(img.device), normalize=True).float()  # (C, D)
    nearest = (img @ words.T).topk(min(k, len(concept_ids)), 1).indices.cpu()  # (n, k)
    return torch.as_tensor(concept_ids)[nearest]


def main():
    args = parser.parse_args()  # with the defaults of the setting --dataset picks, checked (runs.Parser)
    check_flags(args)
    runs.claim_out_dir(args, "nlip")  # refuses a folder holding another run, unless --resume or --overwrite

    # ---- setup
    device = common.setup(args)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")  # fp32 weights
    log = runs.logger(args.out_dir)
    runs.log_flags(log, "nlip", args)
    if args.dataset == "embedded":  # the data on first use; the CLIP is trained here
        embedded.prepare(args.data_root, device, log, pretrain=False)

    # ---- data, the CLIP and the decoder
    train, is_noisy = data.noisy_train(args.dataset, args.data_root, args.noise, args.noise_seed)
    dev, test = (data.load_split(args.dataset, args.data_root, s) for s in ("dev", "test"))
    clean_train = data.load_split(args.dataset, args.data_root, "train")
    truth = captions.by_image(clean_train)  # the true captions, to report on, never to train on
    log(f"data: {len(train.paths)} train images, {len(is_noisy)} captions, {is_noisy.mean():.3f} noisy "
        f"(asked {args.noise}); dev {len(dev.paths)}, test {len(test.paths)} images")
    clip, preprocess, tokenizer = common.load_model(args.model, args.pretrained, device, log)
    cache = None if args.no_image_cache else data.cache_dir(args.data_root)
    pixels = data.Pixels(preprocess, cache, args.workers)
    data.check_splits(pixels, log, train, dev, test)  # every image decodes, no split leaks into another
    evaluate = functools.partial(common.evaluate, pixels=pixels, tokenizer=tokenizer, device=device)
    train_images = pixels.images(train.paths)  # for the captions the decoder writes (training reads the same)
    vocab = captions.vocabulary(train.captions, args.min_count)
    concept_ids = [i for i, w in enumerate(vocab) if i > captions.UNK and w not in STOPWORDS]
    if not concept_ids:
        raise data.UserError(f"--min-count {args.min_count} leaves no concept: no word of the training "
                             "captions outside the stopwords is seen that often; give a lower --min-count")
    if len(concept_ids) < args.concepts:
        raise data.UserError(f"--concepts {args.concepts}: the vocabulary has {len(concept_ids)} concepts "
                             f"(words seen --min-count {args.min_count} times or more, stopwords left out); "
                             f"give at most {len(concept_ids)}")
    concept_tokens = tokenizer([vocab[c] for c in concept_ids])  # (C, L) each concept word as a text
    words = torch.as_tensor(captions.encode(train.captions, vocab, args.max_words + 1))  # (N, T) for L_LM
    captioner = None
    if args.lm_weight > 0:
        length = args.concepts + args.max_words + 2
        widths = clip.transformer.width, clip.visual.transformer.width  # of the text and the image tower
        captioner = Captioner(len(vocab), widths[0], args.dec_layers, widths[1], length).to(device)
    model = NLIP(clip, captioner)
    size = f"{sum(p.numel() for p in captioner.parameters()) / 1e6:.2f}M parameters" if captioner else "none"
    log(f"decoder: {size}; {len(vocab)} words seen >= {args.min_count} times, {len(concept_ids)} concepts")
    opt = runs.optimizer(model, args.lr, args.wd)
    net = model
    if common.world() > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:  # generation stays eager: its sequence grows every step
        net = torch.compile(net)
    steps = len(is_noisy) // args.batch_size  # per epoch (the loader drops the last partial batch)
    if steps == 0:
        raise data.UserError(f"{len(is_noisy)} training pairs make no full batch of {args.batch_size}")
    start, history = 0, []  # a fresh run; --resume reads both from last.pt
    if args.resume:
        start, history = runs.resume(args, clip, opt)
        log(f"resumed from {args.out_dir}/last.pt at epoch {start + 1}")
        if captioner:
            captioner.load_state_dict(common.load_checkpoint(f"{args.out_dir}/last.pt")["decoder"])
    else:
        history.append({"epoch": 0, "dev": evaluate(clip, dev)})
        log(f"start: dev {common.fmt(history[0]['dev'])}")

    for epoch in range(start, args.epochs):
        # ---- before each epoch, under the current model: eps, concepts, and (after warm-up) the captions
        t0 = time.time()
        active = epoch >= args.warmup_epochs
        img, txt = common.features(clip, train, pixels, tokenizer, device)  # (n_img, D), (N, D) normalised
        owner = torch.as_tensor(train.img_of_cap, device=img.device)  # (N,) the image of each pair
        scale = clip.logit_scale.exp().item()
        eps = noise_probability(img, txt, owner, scale, args.batch_size, args.seed + epoch)  # (N,)
        concepts = top_concepts(clip, img, concept_ids, concept_tokens, args.concepts)  # (n_img, k)
        stats = {"eps_auc": float(roc_auc_score(is_noisy, eps)) if 0 < is_noisy.mean() < 1 else None,
                 "used": active, "concepts_in_truth": captions.concept_hits(concepts, vocab, truth)}
        log(f"epoch {epoch + 1} scan: eps AUC {stats['eps_auc'] or float('nan'):.3f} "
            f"({'used' if active else 'warm-up: not used'}), concepts in the image's true captions "
            f"{stats['concepts_in_truth']:.0%}")
        if not active:
            eps = np.zeros_like(eps)
        synthetic = np.zeros(len(eps), dtype=bool)  # (N,) no completion without a decoder or in warm-up
        if captioner and active:
            synthetic = complete(eps, args.replace_above, np.random.default_rng([args.seed, epoch]))
        texts = list(train.captions)
        if synthetic.any():
            need = np.unique(train.img_of_cap[synthetic])  # the images whose generated caption is used
            written = captions.write(model, Subset(train_images, need), concepts[need], vocab, args, pixels)
            for k in np.flatnonzero(synthetic):
                texts[k] = written[np.searchsorted(need, train.img_of_cap[k])]
            report = captions.completion_report(texts, train, truth, synthetic, is_noisy)
            stats.update(report)
            log(f"  completion: {synthetic.sum()} captions, {(synthetic & is_noisy).sum()} truly noisy")
            if report:
                gen, raw = report["generated"], report["noisy"]
                log(f"  on those, against the true captions: generated BLEU-4 {gen['bleu4']:.3f} CIDEr "
                    f"{gen['cider']:.3f}, noisy BLEU-4 {raw['bleu4']:.3f} CIDEr {raw['cider']:.3f}")
        stats["completed"] = int(synthetic.sum())
        stats["completed_noisy"] = int((synthetic & is_noisy).sum())
        stats["scan_s"] = time.time() - t0

        # ---- training: L = mean_i L_NITC_i + lm_weight * mean_i (1 - eps_i) L_LM_i
        eps_t = torch.as_tensor(eps, dtype=torch.float32)  # (N,)
        lam = torch.where(torch.as_tensor(synthetic), args.synthetic_lam, args.lam).float()  # (N,)
        lm_w = torch.as_tensor(1 - eps, dtype=torch.float32)  # (N,)
        pairs = data.Pairs(train._replace(captions=texts), pixels, tokenizer)
        # a new loader each epoch: its worker processes copy this epoch's captions when they start
        loader = runs.loader(pairs, args.batch_size, args.workers, args.seed)
        common.start_epoch(loader, args, epoch)
        model.train()
        t0, nitcs, lms = time.time(), [], []
        for i, (images, tokens, k) in enumerate(loader):
            lr = runs.set_lr(opt, epoch * steps + i, args.epochs * steps, args.warmup, args.lr)
            dec_in, dec_target = captions.lm_inputs(concepts[train.img_of_cap[k]], words[k])  # (B, k+T) each
            images = pixels.normalize(images.to(device))  # (B, 3, H, W)
            tokens = tokens.to(device)  # (B, L)
            with amp:
                img, txt, scale, lm = net(images, tokens, dec_in.to(device), dec_target.to(device))
                nitc = harmonized_loss(img, txt, scale, eps_t[k].to(device), lam[k].to(device),
                                       args.learned_margin)  # (B,)
                loss = nitc.mean() + args.lm_weight * (lm_w[k].to(device) * lm).mean()
            runs.train_step(net, opt, loss)
            nitcs.append(nitc.mean().item())
            lms.append(lm.mean().item())
        train_s = time.time() - t0
        dev_r = evaluate(clip, dev)
        nitc, lm = common.global_mean(nitcs), common.global_mean(lms)  # the epoch's means over every process
        history.append({"epoch": epoch + 1, "nitc": nitc, "lm": lm, **stats, "time_s": train_s, "dev": dev_r})
        log(f"epoch {epoch + 1}/{args.epochs}  L_NITC {nitc:.4f}  L_LM {lm:.4f}  lr {lr:.2e}  "
            f"train {train_s:5.1f}s")
        log(f"epoch {epoch + 1}/{args.epochs}  dev {common.fmt(dev_r)}")
        if captioner:  # a few captions of images whose caption is noisy, as the decoder now writes them
            pairs = np.flatnonzero(is_noisy) if is_noisy.any() else np.arange(len(is_noisy))
            show = pairs[np.unique(train.img_of_cap[pairs], return_index=True)[1][:3]]  # 3 images' first
            shown = train.img_of_cap[show]  # their images
            written = captions.write(model, Subset(train_images, shown), concepts[shown], vocab, args, pixels)
            for k, i, gen in zip(show, shown, written):
                log(f"  image {i}: generated '{gen}'")
                log(f"    raw '{train.captions[k]}'")
                log(f"    true '{truth[i][0]}'")
        extra = {"decoder": captioner.state_dict() if captioner else None, "vocab": vocab}
        runs.save_epoch(args, "nlip", clip, opt, history, extra=extra)

    # ---- test with the best dev checkpoint: zero-shot classification, captioning, retrieval (runs.finish)
    if common.world() > 1:
        torch.distributed.barrier()  # rank 0 has written best.pt
    ck = common.load_checkpoint(f"{args.out_dir}/best.pt")
    clip.load_state_dict(ck["model"])
    extra = {"noise_rate": float(is_noisy.mean())}
    img = common.features(clip, test, pixels, tokenizer, device)[0]  # (n_img, D) for zero-shot and concepts
    if args.dataset == "embedded":
        extra["zero_shot"] = embedded.zero_shot(clip, img, args.data_root, tokenizer, device)
        log("test zero-shot classification, top-1 ('a photo of a {class}'):")
        for k, v in extra["zero_shot"].items():
            log(f"  {k} {v['accuracy']:.1%} (chance {v['chance']:.1%})")
    if captioner:
        captioner.load_state_dict(ck["decoder"])
        concepts = top_concepts(clip, img, concept_ids, concept_tokens, args.concepts)
        written = captions.write(model, pixels.images(test.paths), concepts, vocab, args, pixels)
        refs = captions.by_image(test)
        extra["captioning"] = {"bleu4": captions.bleu4(written, refs), "cider": captions.cider(written, refs)}
        log(f"test captioning ({'greedy' if args.beam == 1 else f'beam {args.beam}'}): "
            f"BLEU-4 {extra['captioning']['bleu4']:.3f}  CIDEr {extra['captioning']['cider']:.3f}")
    runs.finish(args, "nlip", clip, evaluate, test, history, extra=extra)


if __name__ == "__main__":
    runs.run(main)
