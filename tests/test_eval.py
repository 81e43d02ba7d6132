"""The retrieval evaluator against hand-built similarity matrices and a brute-force ranking."""
import numpy as np
import pytest
import torch

from common import fmt_1k, fold_recall, recall


def brute_force(sims, img_of_cap):
    """Recalls by sorting every row, written independently of common.recall."""
    sims, img_of_cap = np.asarray(sims), np.asarray(img_of_cap)
    i2t, t2i = [], []
    for i in range(len(sims)):
        order = np.argsort(-sims[i], kind="stable")
        i2t.append(min(np.flatnonzero(img_of_cap[order] == i)))
    for c in range(sims.shape[1]):
        order = np.argsort(-sims[:, c], kind="stable")
        t2i.append(np.flatnonzero(order == img_of_cap[c])[0])
    r = {f"{d}_r{k}": 100 * np.mean(np.array(ranks) < k)
         for d, ranks in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
    r["rsum"] = sum(r.values())
    return r


def test_perfect_and_hand_built_ranks():
    # 3 images, 2 captions each; image 0's best own caption ranks 2nd, caption 5 ranks its image 3rd
    owner = [0, 0, 1, 1, 2, 2]
    sims = torch.tensor([[0.5, 0.1, 0.9, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.8, 0.7, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0, 0.9, 0.2]])
    r = recall(sims, owner)
    assert r["i2t_r1"] == pytest.approx(200 / 3)  # images 1 and 2 are hits at 1, image 0 is not
    assert r["i2t_r5"] == 100
    # t2i: caption 0 -> image 0 rank 1 (0.5 vs 0, 0); caption 1: 0.1 vs 0, 0 -> rank 1;
    # caption 2: 0.9 > 0.8 -> image 1 is 2nd; caption 3 -> 0.7 top; caption 4 -> 0.9 top; caption 5: 0.2 top
    assert r["t2i_r1"] == pytest.approx(500 / 6)
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))
    assert recall(torch.eye(4), [0, 1, 2, 3])["rsum"] == 600


@pytest.mark.parametrize("value", [0.0, 0.3, float("nan")])
def test_constant_or_nan_similarities_score_no_hit(value):
    """A collapsed (constant) or diverged (NaN) model ranks nothing: with 20 images and 100 captions every
    query has more than 10 others tied with its own, so every recall is 0, not 100."""
    owner = np.repeat(np.arange(20), 5)
    r = recall(torch.full((20, 100), value), owner)
    assert r["rsum"] == 0


def test_a_tie_counts_against_the_query():
    # image 0's only caption ties with image 1's caption; caption 1's own image ties with image 0
    sims = torch.tensor([[0.9, 0.9], [0.2, 0.9]])
    r = recall(sims, [0, 1])
    assert r["i2t_r1"] == 50  # image 0: caption 1 ties its own caption 0
    assert r["t2i_r1"] == 50  # caption 1: image 0 ties its own image 1
    assert r["i2t_r5"] == r["t2i_r5"] == 100
    # a NaN in a row counts against that row's query only
    sims = torch.eye(3)
    sims[0, 0] = float("nan")
    r = recall(sims, [0, 1, 2])
    assert r["i2t_r1"] == r["t2i_r1"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_five_captions(seed):
    rng = np.random.default_rng(seed)
    n_img = 40
    owner = np.repeat(np.arange(n_img), 5)
    sims = rng.normal(size=(n_img, 5 * n_img)) + 2.0 * (owner[None, :] == np.arange(n_img)[:, None])
    got = recall(torch.tensor(sims), owner)
    want = brute_force(sims, owner)
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_fold_recall_computes_each_folds_t2i_r10():
    """COCO 1K: t2i R@10 must be the fold mean of t2i R@10; the official code adds i2t R@10 into it."""
    rng = np.random.default_rng(3)
    fold, n_img = 20, 60
    owner = np.repeat(np.arange(n_img), 5)
    sims = rng.normal(size=(n_img, 5 * n_img)) + 1.0 * (owner[None, :] == np.arange(n_img)[:, None])
    got = fold_recall(torch.tensor(sims), owner, fold=fold)
    folds = [brute_force(sims[f * fold:(f + 1) * fold, f * 5 * fold:(f + 1) * 5 * fold], owner[:5 * fold])
             for f in range(3)]
    for k in folds[0]:
        assert got[k] == pytest.approx(np.mean([r[k] for r in folds])), k
    assert got["left_out"] == 0
    assert got["t2i_r10"] != pytest.approx(np.mean([r["t2i_r10"] + r["i2t_r10"] for r in folds]))
    assert got["rsum"] != recall(torch.tensor(sims), owner)["rsum"]  # folds are easier than the whole set


def test_fold_recall_says_which_images_it_leaves_out():
    rng = np.random.default_rng(4)
    owner = np.repeat(np.arange(50), 5)
    sims = torch.tensor(rng.normal(size=(50, 250)))
    got = fold_recall(sims, owner, fold=20)  # two whole folds; the last 10 images are in none
    assert got["left_out"] == 10
    want = np.mean([recall(sims[f * 20:(f + 1) * 20, f * 100:(f + 1) * 100], owner[:100])["rsum"]
                    for f in range(2)])
    assert got["rsum"] == pytest.approx(want)
    assert fold_recall(sims, owner, fold=60) is None  # fewer images than a fold: no crash, no folds
    assert "fewer than one fold" in fmt_1k(None, 50)
    assert "the last 234 images left out" in fmt_1k(dict(got, left_out=234), 5234)
