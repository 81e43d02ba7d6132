"""NLIP: Noise-robust Language-Image Pre-training (Huang et al., AAAI 2023, arXiv 2212.07086): noise harmonization and
noise completion, for pre-training a CLIP (from scratch, or continued) on noisy pairs.

Noise harmonization: after a warm-up with the plain contrastive loss, a GMM on every pair's InfoNCE loss gives each pair
a noise probability eps_i each epoch (noisy pairs are learnt late: the memorization effect), and the contrastive loss
lets likely-noisy pairs settle at a lower similarity. Noise completion: a captioning decoder, cross-attending to the
image tower's patch tokens and prompted with the image's top-k "concepts" (caption words retrieved by CLIP
similarity), writes captions that replace likely-noisy ones. Loss: L_NITC + 2 L_LM.

    python nlip.py                           # embedded data: nc-tiny from scratch on the noisy train split, CPU
    python nlip.py --lam 0 --lm-weight 0     # the same run as plain contrastive pre-training (the reference)
    python nlip.py --dataset cc120k --data-root /data/cc120k --epochs 30                  # ViT-B-32 from scratch, a GPU
    torchrun --standalone --nproc_per_node=8 nlip.py --dataset cc120k --data-root /data/cc120k --pretrained openai

Paper -> code:
    eps_i, noise probability              eps (N,)     1 - GMM clean posterior of the pair's loss, each epoch after warm-up
    omega_i = lambda eps_i                omega (B,)   in harmonized_loss, whether the pair's caption is raw or synthetic
    L_NITC, L_LM                          nitc, lm (B,) the latter: mean cross-entropy over the caption's words only
    concepts, the decoder                 concepts (n_img, k) word ids; Captioner: [concepts, <bos>, words] -> next words
    completion                            synthetic (N,) bool: the pair trains on its image's generated caption

The harmonized loss (NLIP leaves its form open): a margin omega_i, in cosine, added to pair i's positive logit,
l_i = (CE(s (f_I_i.f_T_j + omega_i [j = i])_j, i) + the same for text-to-image) / 2. eps = 0 gives InfoNCE; a pair
with a larger eps_i meets its loss at a similarity omega_i lower, so it settles lower, and its row stops pushing the
negatives away once met. Noise-scaled soft targets (q_ij = (1 - omega_i) [j = i] + omega_i / n), the other common
form, did worse here (README): their optimum for a noisy pair is a row of equal similarities, which pulls its image
towards every caption of the batch.
The completion rule: a pair with eps_i > --replace-above trains on its image's generated caption, any other pair does
so with probability eps_i (drawn anew each epoch). The pair keeps its omega_i: trusting the synthetic caption fully
(omega = 0) cost rSum here (README), since the tiny model's captions share its blind spots.

Choices where the paper is silent, and why:
  - the decoder is a separate module (torch's TransformerDecoder) over a word vocabulary of the training captions;
    the contrastive text features come from CLIP's own text tower, which never sees image tokens (no leakage).
  - L_LM is weighted by 1 - eps_i, so the decoder learns to caption from the pairs the GMM believes are clean.
  - concepts: the caption words outside a short stopword list seen --min-count times; an image's top-k by cosine
    between its CLIP embedding and the word's CLIP text embedding, under the current model, each epoch.
  - the GMM of each epoch uses the raw captions, in seeded random batches (as npc.py). No MAE branch (optional here).
Infrastructure as baseline.py; --compile compiles CLIP and the decoder in training. Caption generation stays eager
(its sequence grows a word a step: a new shape each time); under torchrun each process writes every W-th batch.
Embedded defaults: nc-tiny from random init, 6 epochs of the 20,000 noisy train pairs, batch 128, lr 1e-3, wd 0.1
(as its pre-training in embedded.py), 100 warm-up steps, 1 warm-up epoch. Measurements: README.
"""
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

# ---- flags (None: the dataset's default, see runs.EMBEDDED and runs.REAL, changed here for pre-training)
parser = runs.Parser(__doc__, embedded={"pretrained": "none", "epochs": 6, "lr": 1e-3, "wd": 0.1, "warmup": 100},
                       real={"pretrained": "none", "lr": 5e-4, "wd": 0.2})
parser.add_argument("--dataset", default="embedded", choices=data.DATASETS, help="which data (default: embedded)")
parser.add_argument("--data-root", help="dataset folder (embedded: data/embedded, generated on first use)")
parser.add_argument("--noise", type=float, help="share of training captions shuffled, in [0, 1)")
parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise permutation (apart from --seed)")
parser.add_argument("--model", help="open_clip model name (nc-tiny: the embedded CPU model); a ViT")
parser.add_argument("--pretrained", help="none (from scratch), an open_clip tag (openai) or a weights file (continued)")
parser.add_argument("--epochs", type=int, help="training epochs")
parser.add_argument("--batch-size", type=int, help="pairs per optimiser step, over all processes")
parser.add_argument("--lr", type=float, help="peak learning rate of AdamW")
parser.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay")
parser.add_argument("--wd", type=float, help="AdamW weight decay (embedded: 0.1, real: 0.2 as CLIP)")
parser.add_argument("--seed", type=int, default=99, help="training seed")
parser.add_argument("--workers", type=int, help="DataLoader worker processes")
parser.add_argument("--out-dir", help="log.txt, results.json, checkpoints (default: out/<method>-<dataset>-n<noise>)")
parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
parser.add_argument("--resume", action="store_true", help="continue from out-dir/last.pt")
parser.add_argument("--overwrite", action="store_true", help="delete the run already in out-dir and start again")
parser.add_argument("--no-image-cache", action="store_true", help="decode every image with PIL each time (default: decode once)")
parser.add_argument("--precision", choices=("bf16", "fp32"), help="autocast of the training forwards (default: bf16 on CUDA)")
parser.add_argument("--compile", action="store_true", help="torch.compile the training forward and backward (CLIP and decoder)")
parser.add_argument("--lam", type=float, default=1.0, help="lambda in omega_i = lambda eps_i, in [0, 1]; 0: no harmonization")
parser.add_argument("--lm-weight", type=float, default=2.0, help="L = L_NITC + this x L_LM (CoCa: 2); 0: no decoder, no completion")
parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs of the plain loss before eps and completion start")
parser.add_argument("--replace-above", type=float, default=0.5, help="a caption with eps above this is replaced")
parser.add_argument("--concepts", type=int, default=5, help="top-k concepts prompted for each image")
parser.add_argument("--min-count", type=int, default=5, help="words seen fewer times are <unk> (and not concepts)")
parser.add_argument("--max-words", type=int, default=30, help="caption length the decoder reads and writes, in words")
parser.add_argument("--dec-layers", type=int, default=2, help="decoder layers (width: the text tower's)")
parser.add_argument("--beam", type=int, default=1, help="beam size of generation (1: greedy)")

STOPWORDS = {"a", "an", "the", "of", "in", "on", "at", "and", "with", "to", "is", "are", "there", "this", "that", "it", "its", "some"}


# ---- the decoder
class Captioner(torch.nn.Module):
    """The concept-conditioned decoder: causal self-attention over [concepts, <bos>, words], cross-attention to the
    image's patch tokens. ids (B, L), patches (B, P, image width) -> next-word logits (B, L, V)."""

    def __init__(self, vocab_size, width, layers, image_width, length):
        super().__init__()
        self.embed, self.pos = torch.nn.Embedding(vocab_size, width), torch.nn.Parameter(0.01 * torch.randn(length, width))
        self.image_proj = torch.nn.Linear(image_width, width)
        layer = torch.nn.TransformerDecoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerDecoder(layer, layers)
        self.ln, self.head = torch.nn.LayerNorm(width), torch.nn.Linear(width, vocab_size)

    def forward(self, ids, patches):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        x = self.blocks(self.embed(ids) + self.pos[:ids.shape[1]], self.image_proj(patches), tgt_mask=causal, tgt_is_causal=True)
        return self.head(self.ln(x))


class NLIP(torch.nn.Module):
    """CLIP and the decoder, one module (one DDP wrapper). -> image and text features (B, D), scale, L_LM (B,)."""

    def __init__(self, clip, captioner):
        super().__init__()
        self.clip, self.captioner = clip, captioner

    @property
    def logit_scale(self):  # common.train_step clamps it
        return self.clip.logit_scale

    def patches(self, images):  # -> pooled image embedding (B, D), patch tokens (B, P, width) after the final norm
        out = self.clip.visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC")
        return out["image_features"], out["image_intermediates"][-1]

    def forward(self, images, tokens, dec_in, dec_target):
        img, patches = self.patches(images)
        txt = self.clip.encode_text(tokens, normalize=True)  # the text tower alone: no image token reaches L_NITC
        lm = torch.zeros(len(img), device=img.device)
        if self.captioner is not None:
            lm = F.cross_entropy(self.captioner(dec_in, patches).transpose(1, 2), dec_target, reduction="none")  # (B, L)
            lm = lm.sum(1) / (dec_target >= 0).sum(1).clamp(min=1)  # (B,) mean over the caption's words (target -100: none)
        return F.normalize(img, dim=-1), txt, self.clip.logit_scale.exp(), lm


def lm_inputs(concepts, words):
    """Decoder input and target of the sequence [c_1..c_k, <bos>, w_1..w_T, <eos>, <pad>..]: concepts (B, k), words
    (B, T) -> (B, k+T), (B, k+T). The prompt is given, never predicted: its targets, and padding's, are -100."""
    seq = torch.cat([concepts, torch.full_like(concepts[:, :1], captions.BOS), words], 1)  # (B, k+1+T)
    target = seq[:, 1:].masked_fill(seq[:, 1:] == captions.PAD, -100)  # (B, k+T) next word; no loss on padding
    target[:, :concepts.shape[1]] = -100  # nor on the positions that would predict c_2..c_k and <bos>
    return seq[:, :-1], target


@torch.no_grad()
def generate(captioner, patches, concepts, length, beam=1):
    """Word ids (B, <= length) of the most likely caption after [concepts, <bos>]: greedy (beam 1) or beam search."""
    B, V = len(concepts), captioner.head.out_features
    seq = torch.cat([concepts, torch.full_like(concepts[:, :1], captions.BOS)], 1).repeat_interleave(beam, 0)  # (B*beam, k+1)
    patches = patches.repeat_interleave(beam, 0)
    score = torch.tensor([0.0] + [-torch.inf] * (beam - 1), device=seq.device).repeat(B, 1)  # (B, beam) expand beam 0 only
    done = torch.zeros(B * beam, dtype=torch.bool, device=seq.device)
    for _ in range(length):
        logp = captioner(seq, patches)[:, -1].float().log_softmax(-1)  # (B*beam, V)
        logp[done] = torch.where(torch.arange(V, device=seq.device) == captions.PAD, 0.0, -torch.inf)  # finished: pad at no cost
        score, top = (score.reshape(-1, 1) + logp).reshape(B, beam * V).topk(beam, 1)  # (B, beam) best continuations
        src = (top // V + beam * torch.arange(B, device=seq.device)[:, None]).reshape(-1)
        seq = torch.cat([seq[src], (top % V).reshape(-1, 1)], 1)
        done = done[src] | (seq[:, -1] == captions.EOS) | (seq[:, -1] == captions.PAD)
        if done.all():
            break
    return seq.reshape(B, beam, -1)[:, 0, concepts.shape[1] + 1:]  # topk sorts: beam 0 is the best


# ---- the two schemes
def harmonized_loss(img, txt, scale, eps, lam):
    """L_NITC per sample: img, txt (B, D) normalised, scale (), eps (B,) noise probabilities -> (B,). eps = 0 is InfoNCE.
    Under DDP the columns are the gathered global batch, as in common.info_nce."""
    all_img, all_txt, offset = common.gather(img), common.gather(txt), common.rank() * len(img)  # (n, D), n = W*B columns
    # ---- EXERCISE harmonized_loss: img, txt (B, D), all_img, all_txt (n, D), offset, scale, eps (B,), lam -> (B,) ----
    # NLIP: omega_i = lambda eps_i, here a margin (in cosine) granted to pair i's positive: its loss is met at a
    # similarity omega_i lower, so the likelier a pair is noise, the lower the similarity it settles at.
    omega = lam * eps  # (B,)
    rows = torch.arange(len(img), device=img.device)
    labels = rows + offset  # (B,) the positive's column
    margin = torch.zeros(len(img), len(all_txt), device=img.device)
    margin[rows, labels] = omega  # (B, n) omega_i on the positive, 0 elsewhere
    l_i2t = F.cross_entropy(scale * (img @ all_txt.T + margin), labels, reduction="none")  # (B,) image -> captions
    l_t2i = F.cross_entropy(scale * (txt @ all_img.T + margin), labels, reduction="none")  # (B,) caption -> images
    loss = (l_i2t + l_t2i) / 2  # (B,)
    # ---- END EXERCISE ----
    return loss


def complete(eps, threshold, rng):
    """Which pairs train on their image's generated caption this epoch: eps (N,) -> synthetic (N,) bool."""
    # ---- EXERCISE complete: eps (N,), threshold, rng -> synthetic (N,) bool ----
    # NLIP's noise completion: replace a caption that is likely noise; mix raw and synthetic for the rest, a pair
    # taking the synthetic caption with probability eps_i (drawn anew each epoch).
    replace = eps > threshold  # (N,)
    mix = rng.random(len(eps)) < eps  # (N,)
    synthetic = replace | mix  # (N,)
    # ---- END EXERCISE ----
    return synthetic


# ---- captions and classes from the model
@torch.no_grad()
def write_captions(net, images, concepts, vocab, args, pixels, device, batch_size=256):
    """Generated captions (strings) of images, a dataset from pixels.images (or a Subset of one), concepts
    (len(images), k) their prompts. Under DDP each process writes every W-th batch, and all gather every caption."""
    def batch(lo, hi):  # word ids (hi - lo, max_words) of images lo:hi, padded
        x = pixels.normalize(torch.stack([images[i][0] for i in range(lo, hi)]).to(device))  # (hi - lo, 3, S, S)
        ids = generate(net.captioner, net.patches(x)[1], concepts[lo:hi].to(device), args.max_words, args.beam)
        return F.pad(ids, (0, args.max_words - ids.shape[1]), value=captions.PAD)
    return captions.decode(common.chunked(batch, len(images), batch_size).tolist(), vocab)


@torch.no_grad()
def scan(clip, train, concept_ids, vocab, args, seed, pixels, tokenizer, device):
    """Under the current model: eps (N,), 1 - the GMM clean posterior of each pair's InfoNCE (raw captions, in seeded
    random batches as npc.py), and concepts (n_img, k), the word ids of each image's top-k concepts."""
    img, txt = common.features(clip, train, pixels, tokenizer, device)  # (n_img, D), (N, D) normalised
    loss = common.pair_losses(img[train.img_of_cap], txt, clip.logit_scale.exp().item(), args.batch_size, seed)  # (N,)
    return 1 - common.gmm_clean_prob(loss), top_concepts(clip, img, concept_ids, vocab, args.concepts, tokenizer, device)


def by_image(split):
    """The captions of each image of a split: [[caption, ...], ...] (n_img lists)."""
    out = [[] for _ in split.paths]
    for c, i in zip(split.captions, split.img_of_cap):
        out[i].append(c)
    return out


def completion_report(texts, raw, truth, owner, synthetic, is_noisy, log):
    """Did completion describe the images better than the noise did? BLEU-4 and CIDEr, against the image's true
    captions, of the synthetic and of the raw captions of the completed pairs that were truly noisy."""
    noisy = np.flatnonzero(synthetic & is_noisy)
    refs = [truth[owner[k]] for k in noisy]
    out = {name: {"bleu4": captions.bleu4(got, refs), "cider": captions.cider(got, refs)} for name, got in
           (("generated", [texts[k] for k in noisy]), ("noisy", [raw[k] for k in noisy]))} if len(noisy) else {}
    log(f"  completion: {synthetic.sum()} captions, {len(noisy)} of them truly noisy" + (
        f"; on those, against the true captions: generated BLEU-4 {out['generated']['bleu4']:.3f} CIDEr "
        f"{out['generated']['cider']:.3f}, noisy BLEU-4 {out['noisy']['bleu4']:.3f} CIDEr {out['noisy']['cider']:.3f}" if len(noisy) else ""))
    return out


def top_concepts(clip, img, concept_ids, vocab, k, tokenizer, device):
    """img (n, D) normalised image embeddings -> (n, k) word ids of the k concepts whose text embedding is nearest."""
    words = clip.encode_text(tokenizer([vocab[c] for c in concept_ids]).to(device), normalize=True).float()  # (C, D)
    return torch.as_tensor(concept_ids)[(img @ words.T).topk(min(k, len(concept_ids)), 1).indices.cpu()]


def main():
    args = runs.parse(parser, "nlip")
    for flag, (low, high) in {"lam": (0, 1), "replace_above": (0, 1), "lm_weight": (0, np.inf), "warmup_epochs": (0, np.inf),
                              "concepts": (1, np.inf), "beam": (1, np.inf), "dec_layers": (1, np.inf), "max_words": (2, np.inf)}.items():
        if not low <= getattr(args, flag) <= high:
            raise data.UserError(f"--{flag.replace('_', '-')} must be {f'in [{low}, {high}]' if high < np.inf else f'>= {low}'}, "
                                 f"got {getattr(args, flag)}")

    # ---- setup
    device = common.setup(args)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")  # fp32 weights
    log = runs.logger(args.out_dir)
    log(f"nlip: {vars(args)}")
    if args.dataset == "embedded":
        embedded.prepare(args.data_root, device, log, pretrain=False)  # the data on first use; the CLIP is trained here

    # ---- data, the CLIP and the decoder
    train, is_noisy = data.noisy_train(args.dataset, args.data_root, args.noise, args.noise_seed)
    dev, test = (data.load_split(args.dataset, args.data_root, s) for s in ("dev", "test"))
    truth = by_image(data.load_split(args.dataset, args.data_root, "train"))  # to report on, never to train on
    log(f"data: {len(train.paths)} train images, {len(is_noisy)} captions, {is_noisy.mean():.3f} noisy "
        f"(asked {args.noise}); dev {len(dev.paths)}, test {len(test.paths)} images")
    clip, preprocess, tokenizer = common.load_model(args.model, args.pretrained, device, log)
    pixels = data.Pixels(preprocess, None if args.no_image_cache else data.cache_dir(args.data_root), args.workers)
    train_images = pixels.images(train.paths)  # for the captions the decoder writes (training reads the same cache)
    vocab = captions.vocabulary(train.captions, args.min_count)
    concept_ids = [i for i, w in enumerate(vocab) if i > captions.UNK and w not in STOPWORDS]
    words = torch.as_tensor(captions.encode(train.captions, vocab, args.max_words + 1))  # (N, T) the raw captions, for L_LM
    captioner = Captioner(len(vocab), clip.transformer.width, args.dec_layers, clip.visual.transformer.width,
                          args.concepts + args.max_words + 2).to(device) if args.lm_weight > 0 else None
    model = NLIP(clip, captioner)
    log(f"decoder: {f'{sum(p.numel() for p in captioner.parameters()) / 1e6:.2f}M parameters' if captioner else 'none'}; "
        f"{len(vocab)} words seen >= {args.min_count} times, {len(concept_ids)} of them concepts")
    opt = common.optimizer(model, args.lr, args.wd)
    net = torch.nn.parallel.DistributedDataParallel(model) if common.world() > 1 else model
    net = torch.compile(net) if args.compile else net  # generation stays eager: its sequence grows every step
    steps = len(is_noisy) // args.batch_size  # per epoch (the loader drops the last partial batch)
    if steps == 0:
        raise data.UserError(f"{len(is_noisy)} training pairs make no full batch of {args.batch_size}")
    start, best, history = runs.resume(args, clip, opt) if args.resume else (0, -1.0, [])
    if start > 0:
        log(f"resumed from {args.out_dir}/last.pt at epoch {start + 1}")
        if captioner:
            captioner.load_state_dict(common.load_checkpoint(f"{args.out_dir}/last.pt")["decoder"])
    else:
        history.append({"epoch": 0, "dev": common.evaluate(clip, dev, pixels, tokenizer, device)})
        log(f"start: dev {common.fmt(history[0]['dev'])}")

    for epoch in range(start, args.epochs):
        # ---- before each epoch, under the current model: eps, concepts, and (after warm-up) the completed captions
        t0, active = time.time(), epoch >= args.warmup_epochs
        eps, concepts = scan(clip, train, concept_ids, vocab, args, args.seed + epoch, pixels, tokenizer, device)
        hits = [len({vocab[c] for c in cs} & set(captions.tokenize(" ".join(t)))) / len(cs) for cs, t in zip(concepts.tolist(), truth)]
        stats = {"eps_auc": float(roc_auc_score(is_noisy, eps)) if 0 < is_noisy.mean() < 1 else None, "used": active,
                 "concepts_in_truth": float(np.mean(hits))}  # the share of an image's concepts that its true captions hold
        log(f"epoch {epoch + 1} scan: eps AUC {stats['eps_auc'] or float('nan'):.3f} ({'used' if active else 'warm-up: not used'}), "
            f"concepts in the image's true captions {stats['concepts_in_truth']:.0%}")
        eps = eps if active else np.zeros_like(eps)
        synthetic = complete(eps, args.replace_above, np.random.default_rng([args.seed, epoch])) if captioner and active else eps > 1
        texts = list(train.captions)
        if synthetic.any():
            need = np.unique(train.img_of_cap[synthetic])  # the images whose generated caption is used
            written = write_captions(model, Subset(train_images, need), concepts[need], vocab, args, pixels, device)
            for k in np.flatnonzero(synthetic):
                texts[k] = written[np.searchsorted(need, train.img_of_cap[k])]
            stats.update(completion_report(texts, train.captions, truth, train.img_of_cap, synthetic, is_noisy, log))
        stats.update(completed=int(synthetic.sum()), completed_noisy=int((synthetic & is_noisy).sum()), scan_s=time.time() - t0)

        # ---- training: L = mean_i L_NITC_i + lm_weight * mean_i (1 - eps_i) L_LM_i
        eps_t, lm_w = (torch.as_tensor(x, dtype=torch.float32) for x in (eps, 1 - eps))  # (N,) each
        loader = common.loader(data.Pairs(train._replace(captions=texts), pixels, tokenizer), args.batch_size, args.workers,
                             args.seed)
        common.start_epoch(loader, args, epoch)
        model.train()
        t0, nitcs, lms = time.time(), [], []
        for i, (images, tokens, k) in enumerate(loader):
            lr = common.set_lr(opt, epoch * steps + i, args.epochs * steps, args.warmup, args.lr)
            dec_in, dec_target = lm_inputs(concepts[train.img_of_cap[k]], words[k])
            with amp:
                img, txt, scale, lm = net(pixels.normalize(images.to(device)), tokens.to(device), dec_in.to(device), dec_target.to(device))
                nitc = harmonized_loss(img, txt, scale, eps_t[k].to(device), args.lam)  # (B,)
                loss = nitc.mean() + args.lm_weight * (lm_w[k].to(device) * lm).mean()
            common.train_step(net, opt, loss)
            nitcs.append(nitc.mean().item())
            lms.append(lm.mean().item())
        train_s, dev_r = time.time() - t0, common.evaluate(clip, dev, pixels, tokenizer, device)
        nitc, lm = common.global_mean(nitcs), common.global_mean(lms)  # the epoch's means over every process
        history.append({"epoch": epoch + 1, "nitc": nitc, "lm": lm, **stats, "time_s": train_s, "dev": dev_r})
        log(f"epoch {epoch + 1}/{args.epochs}  L_NITC {nitc:.4f}  L_LM {lm:.4f}  lr {lr:.2e}  "
            f"train {train_s:5.1f}s  dev {common.fmt(dev_r)}")
        if captioner:  # a few captions of images whose caption is noisy, as the decoder now writes them
            pairs = np.flatnonzero(is_noisy) if is_noisy.any() else np.arange(len(is_noisy))
            show = pairs[np.unique(train.img_of_cap[pairs], return_index=True)[1][:3]]  # the first noisy pair of 3 images
            for k, gen in zip(show, write_captions(model, Subset(train_images, train.img_of_cap[show]),
                                                   concepts[train.img_of_cap[show]], vocab, args, pixels, device)):
                log(f"  image {train.img_of_cap[k]}: generated '{gen}' | raw '{train.captions[k]}' | true '{truth[train.img_of_cap[k]][0]}'")
        best = runs.save_epoch(args, "nlip", clip, opt, epoch, best, history,
                                 extra={"decoder": captioner.state_dict() if captioner else None, "vocab": vocab})

    # ---- test with the best dev checkpoint: zero-shot classification, captioning, then retrieval (runs.finish)
    if common.world() > 1:
        torch.distributed.barrier()  # rank 0 has written best.pt
    ck = common.load_checkpoint(f"{args.out_dir}/best.pt")
    clip.load_state_dict(ck["model"])
    extra = {"noise_rate": float(is_noisy.mean())}
    img = common.features(clip, test, pixels, tokenizer, device)[0]  # (n_img, D) for zero-shot and the concepts
    if args.dataset == "embedded":
        extra["zero_shot"] = embedded.zero_shot(clip, img, args.data_root, tokenizer, device)
        log("test zero-shot classification, top-1 ('a photo of a {class}'): " + ", ".join(
            f"{k} {v['accuracy']:.1%} (chance {v['chance']:.1%})" for k, v in extra["zero_shot"].items()))
    if captioner:
        captioner.load_state_dict(ck["decoder"])
        written = write_captions(model, pixels.images(test.paths), top_concepts(clip, img, concept_ids, vocab, args.concepts, tokenizer, device),
                                 vocab, args, pixels, device)
        refs = by_image(test)
        extra["captioning"] = {"bleu4": captions.bleu4(written, refs), "cider": captions.cider(written, refs)}
        log(f"test captioning ({'greedy' if args.beam == 1 else f'beam {args.beam}'}): BLEU-4 {extra['captioning']['bleu4']:.3f}  "
            f"CIDEr {extra['captioning']['cider']:.3f}")
    runs.finish(args, "nlip", clip, test, pixels, tokenizer, device, log, history, extra=extra)


if __name__ == "__main__":
    runs.run(main)
