"""Caption text for nlip.py: words, a word vocabulary for its decoder, beam search and batched writing, and
the captioning metrics BLEU-4 and CIDEr-D, computed as pycocoevalcap (the COCO caption evaluation code)
computes them.

Mirrors its bleu/bleu_scorer.py (corpus BLEU, reference length "closest") and cider/cider_scorer.py
(CIDEr-D: n-grams up to 4, gaussian length penalty sigma=6, clipped counts, x10, idf over the references of
the whole scored set), so scores are comparable with published ones. pycocoevalcap is not a dependency of
this project: its Java PTB tokenizer is all it would add for these two metrics, and tokenize() below stands
in for it. tests/test_captions.py checks both against pycocoevalcap.
"""
import math
import string
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import common

N = 4  # n-gram orders 1..N, for both metrics (pycocoevalcap's Bleu(4) and Cider(n=4))
SIGMA = 6.0  # CIDEr-D length penalty width, in words (pycocoevalcap's default)
NO_PUNCT = str.maketrans("", "", string.punctuation)


def tokenize(s):
    """Lower-case, delete punctuation, split on whitespace. pycocoevalcap runs Stanford's
    PTBTokenizer -lowerCase and then drops punctuation tokens: the same words on plain captions; it differs
    inside words ("dog's" -> "dog 's", here "dogs")."""
    return s.lower().translate(NO_PUNCT).split()


# ---- Words and a vocabulary of them: ids 0-3 are special, words follow in alphabetical order
PAD, BOS, EOS, UNK = range(4)


def vocabulary(texts, min_count):
    """The words of texts seen at least min_count times, after <pad> <bos> <eos> <unk> (the captioning
    convention: rarer words become <unk>)."""
    counts = Counter(w for t in texts for w in tokenize(t))
    return ["<pad>", "<bos>", "<eos>", "<unk>"] + sorted(w for w, n in counts.items() if n >= min_count)


def encode(texts, vocab, length):
    """Texts -> (N, length) int64 word ids: the words (cut to length - 1), <eos>, then <pad>."""
    index, out = {w: i for i, w in enumerate(vocab)}, np.full((len(texts), length), PAD, dtype=np.int64)
    for k, t in enumerate(texts):
        ids = [index.get(w, UNK) for w in tokenize(t)][:length - 1] + [EOS]
        out[k, :len(ids)] = ids
    return out


def decode(rows, vocab):
    """Rows of word ids -> strings, each up to its first <eos> or <pad>, without <unk>."""
    out = []
    for row in rows:
        row = row[:next((j for j, w in enumerate(row) if w in (EOS, PAD)), len(row))]
        out.append(" ".join(vocab[w] for w in row if w > UNK))
    return out


# ---- Metrics
def ngrams(words):
    """Counts of every n-gram of order 1..N, keyed by the tuple of its words."""
    return Counter(tuple(words[i:i + k]) for k in range(1, N + 1) for i in range(len(words) - k + 1))


def bleu4(candidates, references):
    """Corpus BLEU-4: clipped matches and candidate n-grams are summed over all images before the geometric
    mean, and the brevity penalty compares total candidate length to the total of each candidate's closest
    reference length."""
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's guards against 0/0; they move a score by about 1e-9
    correct, guess = np.zeros(N), np.zeros(N)
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        c, rs = tokenize(cand), [tokenize(r) for r in refs]
        max_ref = Counter()
        for r in rs:
            # | keeps the larger count: a candidate n-gram is credited at most its count in one reference
            max_ref |= ngrams(r)
        for g, count in ngrams(c).items():
            correct[len(g) - 1] += min(count, max_ref[g])
        guess += [max(len(c) - k, 0) for k in range(N)]
        cand_len += len(c)
        # closest reference length, a tie goes to the shorter
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
    bleu = np.prod((correct + tiny) / (guess + small)) ** (1 / N)
    ratio = (cand_len + tiny) / (ref_len + small)
    return float(bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu)


def cider(candidates, references):
    """Corpus CIDEr-D: per image, 10 x the mean over orders n and over references of the tf-idf cosine, with
    candidate weights clipped by the reference's and a gaussian penalty on the length difference; then the
    mean over images."""
    cands = [tokenize(c) for c in candidates]
    refs = [[tokenize(r) for r in rs] for rs in references]
    # idf from the references only: df = number of images whose references contain the n-gram;
    # unseen n-grams count as 1
    df = Counter(g for rs in refs for g in set().union(*map(ngrams, rs)))
    log_images = math.log(len(refs))

    def tfidf(words):
        """Per order n, the vector {n-gram: tf * idf} and its norm."""
        vecs = [{} for _ in range(N)]
        for g, tf in ngrams(words).items():
            vecs[len(g) - 1][g] = tf * (log_images - math.log(max(1, df[g])))
        return vecs, [math.sqrt(sum(w * w for w in v.values())) for v in vecs]

    scores = []
    for c, rs in zip(cands, refs):
        vc, norm_c = tfidf(c)
        total = 0.0
        for r in rs:
            vr, norm_r = tfidf(r)
            penalty = math.exp(-(len(c) - len(r)) ** 2 / (2 * SIGMA ** 2))
            for n in range(N):
                dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
                if dot:  # a zero norm makes dot zero too; pycocoevalcap then skips the division
                    total += penalty * dot / (norm_c[n] * norm_r[n])
        scores.append(10 * total / (N * len(rs)))
    return float(np.mean(scores))


# ---- Generation and reports, for nlip.py
def lm_inputs(concepts, words):
    """Decoder input and target of [c_1..c_k, <bos>, w_1..w_T, <eos>, <pad>..]: concepts (B, k), words (B, T)
    -> (B, k+T), (B, k+T). The prompt is given, never predicted: its targets, and padding's, are -100."""
    seq = torch.cat([concepts, torch.full_like(concepts[:, :1], BOS), words], 1)  # (B, k+1+T)
    target = seq[:, 1:].masked_fill(seq[:, 1:] == PAD, -100)  # (B, k+T) next word; none on padding
    target[:, :concepts.shape[1]] = -100  # nor on the positions that would predict c_2..c_k and <bos>
    return seq[:, :-1], target


@torch.no_grad()
def generate(captioner, patches, concepts, length, beam=1):
    """Word ids (B, <= length) of the most likely caption after [concepts, <bos>], greedy (beam 1) or by beam
    search, from a decoder captioner(ids (B, L), patches (B, P, width)) -> next-word logits (B, L, V)."""
    B, V = len(concepts), captioner.head.out_features
    seq = torch.cat([concepts, torch.full_like(concepts[:, :1], BOS)], 1)  # (B, k+1)
    seq = seq.repeat_interleave(beam, 0)  # (B*beam, k+1)
    patches = patches.repeat_interleave(beam, 0)
    score = torch.tensor([0.0] + [-torch.inf] * (beam - 1), device=seq.device).repeat(B, 1)  # (B, beam)
    done = torch.zeros(B * beam, dtype=torch.bool, device=seq.device)
    pad_only = torch.where(torch.arange(V, device=seq.device) == PAD, 0.0, -torch.inf)  # (V,)
    for _ in range(length):
        logp = captioner(seq, patches)[:, -1].float().log_softmax(-1)  # (B*beam, V)
        logp[done] = pad_only  # a finished caption goes on with <pad>, at no cost
        score, top = (score.reshape(-1, 1) + logp).reshape(B, beam * V).topk(beam, 1)  # (B, beam) the best
        src = (top // V + beam * torch.arange(B, device=seq.device)[:, None]).reshape(-1)
        seq = torch.cat([seq[src], (top % V).reshape(-1, 1)], 1)
        done = done[src] | (seq[:, -1] == EOS) | (seq[:, -1] == PAD)
        if done.all():
            break
    return seq.reshape(B, beam, -1)[:, 0, concepts.shape[1] + 1:]  # topk sorts: beam 0 is the best


@torch.no_grad()
def write(model, images, concepts, vocab, args, pixels, batch_size=256):
    """Generated captions (strings) of images, a dataset from pixels.images (or a Subset of one), concepts
    (len(images), k) their prompts. Under DDP each process writes every W-th batch, and all gather them."""
    device = next(model.parameters()).device

    def batch(lo, hi):  # word ids (hi - lo, max_words) of images lo:hi, padded
        x = torch.stack([images[i][0] for i in range(lo, hi)]).to(device)  # (hi - lo, 3, H, W) uint8
        patches = model.patches(pixels.normalize(x))[1]
        prompts = concepts[lo:hi].to(device)  # (hi - lo, k)
        ids = generate(model.captioner, patches, prompts, args.max_words, args.beam)
        return F.pad(ids, (0, args.max_words - ids.shape[1]), value=PAD)
    return decode(common.chunked(batch, len(images), batch_size).tolist(), vocab)


def by_image(split):
    """The captions of each image of a split: [[caption, ...], ...] (n_img lists)."""
    out = [[] for _ in split.paths]
    for c, i in zip(split.captions, split.img_of_cap):
        out[i].append(c)
    return out


def concept_hits(concepts, vocab, truth):
    """The mean share of an image's concepts, (n_img, k) word ids, that its true captions hold."""
    hits = []
    for ids, texts in zip(concepts.tolist(), truth):
        words = set(tokenize(" ".join(texts)))
        hits.append(len({vocab[c] for c in ids} & words) / len(ids))
    return float(np.mean(hits))


def completion_report(texts, split, truth, synthetic, is_noisy):
    """Did completion describe the images better than the noise did? BLEU-4 and CIDEr, against the image's
    true captions, of the synthetic and of the raw captions of the completed pairs that were truly noisy."""
    noisy = np.flatnonzero(synthetic & is_noisy)
    if len(noisy) == 0:
        return {}
    refs = [truth[split.img_of_cap[k]] for k in noisy]
    generated = [texts[k] for k in noisy]
    raw = [split.captions[k] for k in noisy]
    out = {}
    for name, got in (("generated", generated), ("noisy", raw)):
        out[name] = {"bleu4": bleu4(got, refs), "cider": cider(got, refs)}
    return out
