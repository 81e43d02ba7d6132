"""The retrieval evaluator against hand-built similarity matrices and a brute-force ranking."""
import numpy as np
import pytest
import torch

from common import fold_recall, recall


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
    r = {f"{d}_r{k}": 100 * np.mean(np.array(ranks) < k) for d, ranks in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
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
    # t2i: caption 0 -> image 0 rank 1 (0.5 vs 0, 0); caption 1: 0.1 vs 0, 0 -> rank 1; caption 2: 0.9 > 0.8 -> image 1 is 2nd
    # caption 3 -> 0.7 top; caption 4 -> 0.9 top; caption 5: 0.2 top
    assert r["t2i_r1"] == pytest.approx(500 / 6)
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))
    assert recall(torch.eye(4), [0, 1, 2, 3])["rsum"] == 600


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
    folds = [brute_force(sims[f * fold:(f + 1) * fold, f * 5 * fold:(f + 1) * 5 * fold], owner[:5 * fold]) for f in range(3)]
    for k in got:
        assert got[k] == pytest.approx(np.mean([r[k] for r in folds])), k
    assert got["t2i_r10"] != pytest.approx(np.mean([r["t2i_r10"] + r["i2t_r10"] for r in folds]))
    assert got["rsum"] != recall(torch.tensor(sims), owner)["rsum"]  # folds are easier than the whole set
