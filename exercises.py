"""The course kit: a student copy of the project with every EXERCISE block blank, and the grader for it.

    python exercises.py make DIR            # the student copy, and DIR/EXERCISES.md (the exercises, in order)
    python exercises.py grade DIR           # one line per exercise, then the score; exit 0 only if all pass
    python exercises.py grade DIR --train   # then the student's npc.py for one epoch on the embedded data
    python exercises.py grade .             # the reference: this project's own blocks pass

make copies the project's files, never its git history, caches, tests or this file (they hold the answers),
and replaces the body of every block between `# ---- EXERCISE name: ... ----` and `# ---- END EXERCISE ----`
by `raise NotImplementedError("exercise name")`. The block's header comment stays: its inputs and outputs
with their shapes, and the paper's equation.

grade checks each exercise in a child process of its own with a time limit, so a hang or a crash fails that
exercise alone. The checks run the student's function on random inputs of several shapes and seeds and
compare it with properties and with a computation written here another way (row by row, in float64, Bayes'
rule by hand). Where the function calls another exercise's function, this file's version stands in, so one
bug fails one exercise. tests/test_exercises.py runs these checks on the project's blocks, on a blank copy
and on copies with one planted bug each.
This file imports no project file: the children import the student's.
"""
import argparse
import contextlib
import functools
import importlib
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
FILES = ("README.md", "requirements.txt", "pyproject.toml", "common.py", "data.py", "embedded.py", "runs.py",
         "captions.py", "baseline.py", "npc.py", "sdd.py", "nlip.py", "eval.py", "bench.py")  # the copy's
BEGIN = re.compile(r"^( *)# ---- EXERCISE (\w+)(: .*)? ----$")
END = re.compile(r"^ *# ---- END EXERCISE ----$")
TIME_LIMIT = 60  # seconds for one exercise's checks (they take about 1 s)
PRELOAD = ["numpy", "torch", "sklearn.mixture", "sklearn.metrics", "open_clip", "PIL.Image"]  # not project's


class UserError(Exception):
    """Bad input from the command line: one line, exit 2."""


class Failed(Exception):
    """A check the student's function did not meet: its message is the grade line's."""


# ---- the student's modules, and this file's stand-ins for the exercises they call
def student(module):
    """The student's module, from the folder the child process put first on sys.path."""
    m = importlib.import_module(module)
    if Path(m.__file__).resolve().parent != Path(sys.path[0]):
        raise Failed(f"{module}.py is not in the folder graded")
    return m


@contextlib.contextmanager
def replaced(module, **functions):
    """module's functions replaced for the duration, then put back."""
    saved = {name: getattr(module, name) for name in functions}
    for name, fn in functions.items():
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def elsewhere(x):
    """The rows another process would gather before ours: made from x, so images and captions differ."""
    return F.normalize(x.detach().roll(1, 0) + 0.5 * x.detach().flip(1), dim=-1)


def as_second_process(common):
    """common's DDP helpers as process 1 of 2 sees them: gather puts the other process's rows first."""
    return replaced(common, world=lambda: 2, rank=lambda: 1, gather=lambda x: torch.cat([elsewhere(x), x]))


def contrastive(img, txt, scale, all_img, all_txt, offset, omega=None):
    """Row by row, in the inputs' dtype: l_i = (lse_j a_ij - a_ip + lse_j b_ij - b_ip) / 2, p = offset + i,
    a_ij = s img_i . all_txt_j + s' omega_i [j = p], b likewise from txt and all_img, s' = s without its
    gradient. -> (B,)"""
    rows = []
    for i in range(len(img)):
        p = offset + i
        bonus = torch.zeros(len(all_txt), dtype=img.dtype)
        if omega is not None:
            bonus[p] = omega[i]
        s_margin = scale.detach() if torch.is_tensor(scale) else scale
        a = scale * (all_txt @ img[i]) + s_margin * bonus  # (n,)
        b = scale * (all_img @ txt[i]) + s_margin * bonus  # (n,)
        rows.append((torch.logsumexp(a, 0) - a[p] + torch.logsumexp(b, 0) - b[p]) / 2)
    return torch.stack(rows)


def info_nce(img, txt, scale, local=False):
    """This file's per-sample InfoNCE, standing in for the student's (one process)."""
    return contrastive(img.double(), txt.double(), scale, img.double(), txt.double(), 0).to(img.dtype)


def posterior(gmm, x, component):
    """p(component | x) of a fitted 1-D GaussianMixture by Bayes' rule: x (N, 1) -> (N,)."""
    var = gmm.covariances_.reshape(-1)  # (2,)
    log = np.log(gmm.weights_) - 0.5 * np.log(2 * np.pi * var) - (x - gmm.means_.reshape(-1)) ** 2 / (2 * var)
    p = np.exp(log - log.max(1, keepdims=True))  # (N, 2)
    return p[:, component] / p.sum(1)


def gmm_clean_prob(common):
    """This file's clean posterior, standing in for the student's; the fit is the student's common.gmm_fit."""
    def clean_prob(x, higher_is_clean=False, max_iter=100):
        gmm, x = common.gmm_fit(x, max_iter)
        means = gmm.means_.reshape(-1)
        return posterior(gmm, x, int(np.argmax(means) if higher_is_clean else np.argmin(means)))
    return clean_prob


# ---- what the checks compare
def array(x, name, shape, dtype=None):
    """x as a numpy array, after checking its shape (and kind: 'b' bool, 'i' integer, 'f' float)."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.shape != shape:
        raise Failed(f"{name} has shape {x.shape}, expected {shape}")
    if dtype and x.dtype.kind != dtype and not (dtype == "i" and x.dtype.kind == "u"):
        kinds = {"b": "bool", "i": "integer", "f": "float"}
        raise Failed(f"{name} is of dtype {x.dtype}, expected {kinds[dtype]}")
    return x


def close(got, want, what, tol=1e-4):
    """Fails with the worst element when |got - want| > tol (1 + |want|) somewhere."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if not np.isfinite(got).all():
        raise Failed(f"{what}: not finite ({got.ravel()[~np.isfinite(got.ravel())][0]})")
    err = np.abs(got - want) / (1 + np.abs(want))
    if err.max() > tol:
        k = np.unravel_index(err.argmax(), err.shape)
        raise Failed(f"{what}: element {k if len(k) > 1 else k[0]} is {got[k]:.6g}, expected {want[k]:.6g}")


def features(seed, *shape):
    """Random unit rows (float32), seeded."""
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def losses(rng, B):
    """Memory losses before and after a look-ahead (B,) each, float32: ratios on both sides of 1."""
    l_I, l_T = rng.uniform(0.2, 5.0, (2, B))
    l_I_after, l_T_after = np.array([l_I, l_T]) * np.exp(rng.normal(0, 0.3, (2, B)))
    return [torch.tensor(x, dtype=torch.float32) for x in (l_I, l_T, l_I_after, l_T_after)]


def same_loss_and_gradients(fn, want_fn, img, txt, scale, what):
    """fn (float32) and want_fn (float64) agree on l (B,) and on the gradients of sum(l) to img, txt and
    scale."""
    leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
    leaves.append(torch.tensor(scale, requires_grad=True))
    got = fn(*leaves)
    array(got, f"{what}: l", (len(img),), "f")
    if not torch.is_tensor(got) or got.grad_fn is None:
        raise Failed(f"{what}: l carries no gradient (it trains the model: keep it in torch, attached)")
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    want = want_fn(*ref_leaves)
    close(got.detach().numpy(), want.detach().numpy(), f"{what}: l")
    grads = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(want.sum(), ref_leaves)
    for name, g, r in zip(("img", "txt", "scale"), grads, ref_grads):
        if g is None:
            raise Failed(f"{what}: l does not depend on {name}")
        close(g.numpy(), r.numpy(), f"{what}: the gradient of sum(l) to {name}")


# ---- the checks, one function an exercise
def alone(img, txt, scale, omega=None):
    """The reference loss in one process: the batch is all the columns."""
    return contrastive(img, txt, scale, img, txt, 0, omega)


def second_of_two(img, txt, scale, omega=None):
    """The reference loss as process 1 of 2: the other process's B rows come first, our positives are
    columns B + i."""
    all_img, all_txt = torch.cat([elsewhere(img), img]), torch.cat([elsewhere(txt), txt])
    return contrastive(img, txt, scale, all_img, all_txt, len(img), omega)


def check_info_nce():
    common = student("common")
    for seed, B, D, scale in ((0, 1, 4, 1.0), (1, 5, 8, 14.3), (2, 16, 32, 50.0), (3, 7, 3, 100.0)):
        img, txt = features(seed, B, D), features(seed + 50, B, D)
        what = f"B={B}, D={D}, s={scale}"
        same_loss_and_gradients(common.info_nce, alone, img, txt, scale, what)
        with as_second_process(common):
            same_loss_and_gradients(common.info_nce, second_of_two, img, txt, scale, f"{what}, process 1/2")


GMM_CASES = ((0, 400, 0.3, 0.1, 0.8, 0.1), (1, 1000, 0.6, 2.0, 5.0, 0.6), (2, 60, 0.5, -1.0, 1.0, 0.3),
             (3, 3000, 0.2, 0.0, 0.3, 0.05), (4, 500, 0.7, 10.0, 11.0, 0.15))  # sklearn orders them both ways


def two_modes(seed, n, share, low, high, sd):
    """n values (N,): a share of them around high, the rest around low, each mode of spread sd."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < share, rng.normal(high, sd, n), rng.normal(low, sd, n))


def check_gmm_clean_prob():
    common = student("common")
    for seed, n, *modes in GMM_CASES:
        x = two_modes(seed, n, *modes)
        gmm, scaled = common.gmm_fit(x)
        means = gmm.means_.reshape(-1)
        for higher_is_clean in (False, True):
            what = f"seed {seed}, N={n}, higher_is_clean={higher_is_clean}: p_clean"
            p = array(common.gmm_clean_prob(x, higher_is_clean=higher_is_clean), what, (n,), "f")
            clean = int(np.argmax(means) if higher_is_clean else np.argmin(means))
            close(p, posterior(gmm, scaled, clean), what + " (the posterior of the clean component)", 1e-6)


def check_neighbours():
    for module, pool in (("npc", "clean"), ("sdd", "pool")):
        fn = student(module).neighbours
        for seed, n_img, D, share in ((0, 6, 3, 0.5), (1, 40, 16, 0.3), (2, 25, 8, 1.0), (3, 12, 4, 0.0)):
            rng = np.random.default_rng(seed)
            owner = torch.as_tensor(np.repeat(np.arange(n_img), rng.integers(1, 6, n_img)))  # (N,) 1-5 each
            N = len(owner)
            img, txt = features(seed, n_img, D), features(seed + 50, N, D)
            chosen = np.sort(rng.choice(N, max(1, round(share * N)), replace=False))  # (C,), C >= 1
            what = f"{module}.py, seed {seed}: N={N} pairs of {n_img} images, D={D}, {len(chosen)} in {pool}"
            try:
                bank_img, bank_txt = fn(img, txt, owner, chosen)
            except NotImplementedError:
                if module == "npc":
                    raise
                raise Failed("npc.py's passes, but sdd.py's copy is blank: write it there too") from None
            sides = (("bank_img", bank_img, img[owner]), ("bank_txt", bank_txt, txt))
            for name, bank, f in sides:  # f (N, D): the feature of each pair on that side
                bank = array(bank, f"{what}: {name}", (N,), "i")
                if not np.isin(bank, chosen).all():
                    k = int(np.flatnonzero(~np.isin(bank, chosen))[0])
                    raise Failed(f"{what}: {name}[{k}] = {bank[k]} is not a {pool} pair")
                best = (f @ f[chosen].T).max(1).values.numpy()  # (N,) the highest cosine among the pool
                got = (f * f[bank]).sum(1).numpy()  # (N,) the cosine of the one chosen
                close(got, best, f"{what}: the cosine of pair k and {name}[k], against the {pool}'s best")


def check_npc_weight():
    npc = student("npc")
    for seed, B in ((0, 1), (1, 7), (2, 64)):
        l_I, l_T, l_I_after, l_T_after = losses(np.random.default_rng(seed), B)
        w = array(npc.npc_weight(l_I, l_T, l_I_after, l_T_after), f"seed {seed}, B={B}: w", (B,), "f")
        want = []
        for i in range(B):
            r = (l_I[i].item() / l_I_after[i].item() + l_T[i].item() / l_T_after[i].item()) / 2
            want.append(math.tanh(r) if r < 1 else 1.0)
        close(w, want, f"seed {seed}, B={B}: w", 1e-5)


def check_self_drop():
    sdd, common = student("sdd"), student("common")
    with replaced(common, gmm_clean_prob=gmm_clean_prob(common)):
        for seed, n, noisy, alpha in ((0, 50, 0.4, 0.25), (1, 300, 0.2, 0.1), (2, 2000, 0.6, 0.3)):
            rng = np.random.default_rng(seed)
            S = np.where(rng.random(n) < noisy, rng.normal(0.15, 0.08, n), rng.normal(0.5, 0.08, n))  # (N,)
            what = f"seed {seed}, N={n}, alpha={alpha}"
            keep, w_con = sdd.self_drop(S, alpha)
            keep = array(keep, f"{what}: keep", (n,), "b")
            w_con = array(w_con, f"{what}: w_con", (n,), "f")
            wrong = [i for i in range(n) if keep[i] != (S[i] > alpha)]
            if wrong:
                raise Failed(f"{what}: keep[{wrong[0]}] is {keep[wrong[0]]} for S = {S[wrong[0]]:.4f}")
            gmm, scaled = common.gmm_fit(S, max_iter=10)
            p = posterior(gmm, scaled, int(np.argmax(gmm.means_.reshape(-1))))  # the high-similarity one
            close(w_con, (p - p.min()) / (p.max() - p.min()), f"{what}: w_con", 1e-4)


def check_dual_weight():
    sdd = student("sdd")
    for seed, B in ((0, 1), (1, 9), (2, 64)):
        rng = np.random.default_rng(seed)
        w_con = torch.tensor(rng.uniform(0, 1, B), dtype=torch.float32)
        l_I, l_T, l_I_after, l_T_after = losses(rng, B)
        w_sig, w = sdd.dual_weight(w_con, l_I, l_T, l_I_after, l_T_after)
        w_sig = array(w_sig, f"seed {seed}, B={B}: w_sig", (B,), "f")
        w = array(w, f"seed {seed}, B={B}: w", (B,), "f")
        want_sig, want = [], []
        for i in range(B):
            r = (l_I[i].item() / l_I_after[i].item() + l_T[i].item() / l_T_after[i].item()) / 2
            want_sig.append(math.tanh(r) if r < 1 else 1.0)
            want.append(want_sig[-1] * w_con[i].item())
        close(w_sig, want_sig, f"seed {seed}, B={B}: w_sig", 1e-5)
        close(w, want, f"seed {seed}, B={B}: w", 1e-5)


def check_noise_probability():
    nlip, common = student("nlip"), student("common")
    with replaced(common, info_nce=info_nce, gmm_clean_prob=gmm_clean_prob(common)):
        for seed, n_img, D, scale, batch, noisy in ((0, 60, 16, 14.3, 32, 0.4), (1, 150, 8, 30.0, 50, 0.2)):
            rng = np.random.default_rng(seed)
            owner = torch.as_tensor(np.repeat(np.arange(n_img), rng.integers(1, 4, n_img)))  # (N,)
            N = len(owner)
            img = features(seed, n_img, D)
            is_noisy = rng.random(N) < noisy
            shown = torch.where(torch.as_tensor(is_noisy), torch.as_tensor(rng.integers(0, n_img, N)), owner)
            txt = F.normalize(img[shown] + 0.15 * features(seed + 50, N, D), dim=-1)  # a caption of `shown`
            what = f"seed {seed}, N={N}, batch {batch}: eps"
            eps = array(nlip.noise_probability(img, txt, owner, scale, batch, seed), what, (N,), "f")
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))  # pair_losses' batches
            loss = torch.zeros(N, dtype=torch.float64)
            for b in perm.split(batch):
                loss[b] = info_nce(img[owner[b]].double(), txt[b].double(), scale)
            gmm, scaled = common.gmm_fit(loss.numpy())
            close(eps, 1 - posterior(gmm, scaled, int(np.argmin(gmm.means_.reshape(-1)))), what, 1e-4)


def check_harmonized_loss():
    nlip, common = student("nlip"), student("common")
    for seed, B, D, scale, lam in ((0, 1, 4, 1.0, 1.0), (1, 6, 8, 14.3, 0.5), (2, 16, 32, 50.0, 1.0)):
        rng = np.random.default_rng(seed)
        img, txt = features(seed, B, D), features(seed + 50, B, D)
        eps = torch.tensor(rng.uniform(0, 1, B), dtype=torch.float32)  # (B,)
        what = f"B={B}, D={D}, s={scale}, lambda={lam}"
        loss = functools.partial(nlip.harmonized_loss, eps=eps, lam=lam)
        omega = lam * eps.double()  # (B,)
        same_loss_and_gradients(loss, functools.partial(alone, omega=omega), img, txt, scale, what)
        with as_second_process(common):
            same_loss_and_gradients(loss, functools.partial(second_of_two, omega=omega), img, txt, scale,
                                    f"{what}, process 1/2")


def check_complete():
    nlip = student("nlip")

    def synthetic(eps, threshold, seed, what):
        return array(nlip.complete(eps, threshold, np.random.default_rng(seed)), what, eps.shape, "b")
    eps = np.random.default_rng(0).uniform(0, 1, 1000)
    got = synthetic(eps, 0.5, 0, "eps ~ U[0, 1], N=1000: synthetic")
    if not got[eps > 0.5].all():
        raise Failed("a pair with eps above the threshold keeps its raw caption")
    if synthetic(np.zeros(500), 0.5, 0, "eps = 0: synthetic").any():
        raise Failed("a pair with eps = 0 takes the synthetic caption")
    for share, threshold in ((0.3, 0.5), (0.05, 0.5), (0.7, 0.9)):  # the mixing: with probability eps
        rate = synthetic(np.full(40000, share), threshold, 1, f"eps = {share}: synthetic").mean()
        if abs(rate - share) > 0.015:
            raise Failed(f"with eps = {share} and threshold {threshold}, {rate:.3f} of the pairs take the "
                         f"synthetic caption, expected {share} (drawn with probability eps)")
    ramp = np.linspace(0, 0.5, 40000)  # each pair with its own eps
    got = synthetic(ramp, 0.5, 2, "eps from 0 to 0.5: synthetic")
    for lo, hi in ((0.0, 0.1), (0.4, 0.5)):
        part = (ramp >= lo) & (ramp < hi)
        if abs(got[part].mean() - (lo + hi) / 2) > 0.02:
            raise Failed(f"pairs with eps in [{lo}, {hi}) take the synthetic caption at rate "
                         f"{got[part].mean():.3f}, expected about {(lo + hi) / 2}: each pair by its own eps")
    torch.manual_seed(7)
    np.random.seed(7)
    first = synthetic(np.full(2000, 0.3), 0.5, 3, "synthetic")
    np.random.seed(8)
    torch.manual_seed(8)
    if not np.array_equal(first, synthetic(np.full(2000, 0.3), 0.5, 3, "synthetic")):
        raise Failed("the same rng seed gave another draw: draw from the rng given, nothing else")
    if np.array_equal(first, synthetic(np.full(2000, 0.3), 0.5, 4, "synthetic")):
        raise Failed("another rng seed gave the same draw: draw from the rng given")


# ---- the exercises, in teaching order
class Exercise(NamedTuple):
    name: str  # the block's name
    title: str
    where: tuple  # (file, function) of each block; sdd.py holds its own copy of NPC's neighbours
    paper: str
    checks: str  # what the grader compares, for EXERCISES.md
    minutes: int  # a rough time for a student who has read the paper
    check: object  # the function that checks it


EXERCISES = (
    Exercise("info_nce", "per-sample symmetric InfoNCE", (("common.py", "info_nce"),),
             "CLIP (Radford et al., ICML 2021, arXiv 2103.00020), Sec. 2.3 and Figure 3: the symmetric "
             "cross-entropy, kept per sample as every method here needs it",
             "l (B,) and its gradients to img, txt and s, against a row-by-row logsumexp in float64, for "
             "batches of 1-16 and s from 1 to 100, alone and as process 1 of 2 (the positive of row i is "
             "column offset + i)", 20, check_info_nce),
    Exercise("gmm_clean_prob", "the GMM clean posterior", (("common.py", "gmm_clean_prob"),),
             "NCR (Huang et al., NeurIPS 2021), the memorization effect: a 2-component GMM on per-sample "
             "losses; NPC, SDD and NLIP all use it",
             "p_clean (N,) against Bayes' rule written out from the fitted means, variances and weights, on "
             "five two-mode samples (N from 60 to 3,000), for a loss and for a similarity", 15,
             check_gmm_clean_prob),
    Exercise("neighbours", "NPC's memory-bank neighbours",
             (("npc.py", "neighbours"), ("sdd.py", "neighbours")),
             "NPC (Zhang et al., AAAI 2024, arXiv 2312.05777), the memory bank (Figure 2a): every pair's "
             "nearest clean pair, image side and text side",
             "in npc.py and in its copy in sdd.py: both banks (N,) hold pool pairs only, each of the highest "
             "cosine to pair k among the pool (ties: any of them), on 1-5 captions an image, pools of 1 to N",
             25, check_neighbours),
    Exercise("npc_weight", "NPC's weight", (("npc.py", "npc_weight"),),
             "NPC, the negative impact of a pair and its confidence weight (Figure 2b)",
             "w (B,) against tanh(r) or 1, r from the four losses one pair at a time, batches of 1-64 with "
             "ratios on both sides of 1", 10, check_npc_weight),
    Exercise("self_drop", "SDD's self-drop and confidence weight", (("sdd.py", "self_drop"),),
             "SDD (Liu et al., arXiv 2412.06172): self-drop and the confidence weight w_con",
             "keep (N,) bool against S > alpha pair by pair; w_con (N,) against the min-max scaled "
             "posterior of the high-similarity component (max_iter 10), N from 50 to 2,000", 15,
             check_self_drop),
    Exercise("dual_weight", "SDD's dual weight", (("sdd.py", "dual_weight"),),
             "SDD: the significance weight w_sig (NPC's look-ahead) and the dual weight w_sig w_con",
             "w_sig and w (B,) against a pair-by-pair computation, batches of 1-64", 10, check_dual_weight),
    Exercise("noise_probability", "NLIP's noise probability", (("nlip.py", "noise_probability"),),
             "NLIP (Huang et al., AAAI 2023, arXiv 2212.07086), noise harmonization (Figure 1a): the noise "
             "probability eps of each pair",
             "eps (N,) against 1 - the low-loss posterior of the losses in the same seeded batches, pairs "
             "with 1-3 captions an image, a share of them mismatched", 10, check_noise_probability),
    Exercise("harmonized_loss", "NLIP's harmonized loss", (("nlip.py", "harmonized_loss"),),
             "NLIP, noise harmonization (Figure 1a): the noise-adaptive contrastive loss L_NITC, here with "
             "the margin omega = lambda eps on the positive (nlip.py's docstring says why this form)",
             "l (B,) and its gradients to img, txt and s, against a row-by-row logsumexp with the margin on "
             "the positive column (not trained through s), alone and as process 1 of 2", 25,
             check_harmonized_loss),
    Exercise("complete", "NLIP's caption completion", (("nlip.py", "complete"),),
             "NLIP, noise completion (Figure 1b): which pairs train on their image's generated caption",
             "synthetic (N,) bool: every pair above the threshold, none at eps 0, the others at a rate of "
             "eps (within 0.015 on 40,000 pairs, also pair by pair), the same draw for the same rng seed "
             "whatever the global seeds, another for another seed", 10, check_complete),
)
BY_NAME = {ex.name: ex for ex in EXERCISES}
SCRIPTS_NEED = {"npc.py": ("info_nce", "gmm_clean_prob", "neighbours", "npc_weight"),
                "sdd.py": ("info_nce", "gmm_clean_prob", "self_drop", "neighbours", "dual_weight"),
                "nlip.py": ("info_nce", "gmm_clean_prob", "noise_probability", "harmonized_loss", "complete")}


# ---- grading: one child process an exercise
def child(folder, name, conn):
    """In a child process: check exercise name on the code in folder, and send (verdict, detail)."""
    folder = str(Path(folder).resolve())
    sys.path[:] = [folder] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    for file in FILES:  # a project module imported before (by the main module, say) is not the student's
        sys.modules.pop(file.removesuffix(".py"), None)
    torch.set_num_threads(1)
    try:
        BY_NAME[name].check()
        verdict = ("pass", "")
    except NotImplementedError as e:
        blank = str(e) == f"exercise {name}"
        verdict = ("not implemented", "") if blank else ("fail", blame(e, folder))
    except Failed as e:
        verdict = ("fail", str(e))
    except (Exception, SystemExit) as e:  # noqa: BLE001 (any error of the student's code is a fail)
        verdict = ("fail", blame(e, folder))
    conn.send(verdict)


def blame(e, folder):
    """An exception in one line, with the last place in the student's files it passed through."""
    places = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(folder + os.sep)]
    where = f" ({Path(places[-1].filename).name}:{places[-1].lineno})" if places else ""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}{where}"


def grade(folder, names=None, time_limit=TIME_LIMIT):
    """[(exercise, verdict, detail)] for the code in folder, in teaching order (only those named, if names):
    each exercise checked in a child process of its own, at most as many at a time as there are cores."""
    ctx = multiprocessing.get_context("forkserver")  # children forked from a process that imported torch once
    ctx.set_forkserver_preload(PRELOAD)
    jobs = max(1, len(os.sched_getaffinity(0)))
    todo = [ex for ex in EXERCISES if names is None or ex.name in names]
    running, verdicts = {}, {}
    while todo or running:
        while todo and len(running) < jobs:
            ex = todo.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            process = ctx.Process(target=child, args=(str(folder), ex.name, send), daemon=True)
            process.start()
            send.close()
            running[ex.name] = (process, receive, time.monotonic() + time_limit)
        multiprocessing.connection.wait([r for _, r, _ in running.values()], timeout=0.2)
        for name, (process, receive, deadline) in list(running.items()):
            if receive.poll():
                verdicts[name] = answer(receive, process)
            elif time.monotonic() > deadline:
                process.kill()
                verdicts[name] = ("fail", f"no verdict within {time_limit} s (an endless loop?)")
            else:
                continue
            process.join()
            del running[name]
    return [(ex, *verdicts[ex.name]) for ex in EXERCISES if ex.name in verdicts]


def answer(receive, process):
    """The child's (verdict, detail), or a fail if it died first."""
    try:
        return receive.recv()
    except EOFError:
        process.join()
        return ("fail", f"the process died before its verdict (exit code {process.exitcode})")


def train(folder, data_root, results):
    """The student's npc.py, one epoch on the embedded data, its output shown as it runs. -> exit code"""
    blank = [ex.name for ex, verdict, _ in results
             if ex.name in SCRIPTS_NEED["npc.py"] and verdict == "not implemented"]
    if blank:
        print(f"--train: skipped: npc.py needs {', '.join(blank)} first")
        return 1
    out = Path(folder) / "out" / "grade-npc"
    cmd = [sys.executable, "npc.py", "--epochs", "1", "--data-root", str(Path(data_root).resolve()),
           "--out-dir", str(out), "--overwrite"]
    print(f"--train: python {' '.join(cmd[1:])}  (about 5 min on 2 cores, on the full embedded data)",
          flush=True)
    try:
        code = subprocess.run(cmd, cwd=folder, check=False, timeout=3600).returncode
    except subprocess.TimeoutExpired:
        print("--train: npc.py gave no result within an hour")
        return 1
    print(f"--train: npc.py exited with code {code}; its log and results: {out}")
    return code


# ---- the student copy
def blank(text, file):
    """text with the body of every EXERCISE block replaced by a stub that raises NotImplementedError; the
    header comment (the EXERCISE line and the comment lines after it) stays. -> (text, [(name, function,
    line of the stub)])"""
    lines, out, blocks, function = text.splitlines(keepends=True), [], [], None
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\n")
        function = re.match(r"def (\w+)", line).group(1) if line.startswith("def ") else function
        if END.match(line):
            raise UserError(f"{file}:{i + 1}: an END EXERCISE line without its EXERCISE line")
        begin = BEGIN.match(line)
        out.append(lines[i])
        i += 1
        if not begin:
            continue
        indent, name = begin.group(1), begin.group(2)
        while i < len(lines) and lines[i].lstrip().startswith("#") and not END.match(lines[i].rstrip("\n")):
            out.append(lines[i])
            i += 1
        out.append(f'{indent}raise NotImplementedError("exercise {name}")\n')
        blocks.append((name, function, len(out)))
        while i < len(lines) and not END.match(lines[i].rstrip("\n")):
            if BEGIN.match(lines[i].rstrip("\n")):
                raise UserError(f"{file}:{i + 1}: an EXERCISE block inside EXERCISE {name}")
            i += 1
        if i == len(lines):
            raise UserError(f"{file}: EXERCISE {name} has no END EXERCISE line")
        out.append(lines[i])
        i += 1
    return "".join(out), blocks


def student_files():
    """{file: text} of the student copy, EXERCISES.md included; every block found must be in EXERCISES, in
    the function it names, and every exercise's blocks must be found."""
    copies, found = {}, {}
    for file in FILES:
        text = (ROOT / file).read_text(encoding="utf-8")
        if file.endswith(".py"):
            text, blocks = blank(text, file)
            compile(text, file, "exec")
            found.update({(file, function): (name, line) for name, function, line in blocks})
        copies[file] = text
    expected = {where: ex.name for ex in EXERCISES for where in ex.where}
    for (file, function), (name, _) in found.items():
        if expected.get((file, function)) != name:
            raise UserError(f"{file}: EXERCISE {name} in {function}() is not in exercises.py's EXERCISES")
    for (file, function), name in expected.items():
        if (file, function) not in found:
            raise UserError(f"exercises.py: EXERCISE {name} is not in {file}'s {function}()")
    copies["EXERCISES.md"] = guide({where: line for where, (_, line) in found.items()})
    return copies


def make(dst):
    """Write the student copy into dst, a new or empty folder, whole or not at all."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} exists and is not an empty folder: make writes into a new or empty one")
    copies = student_files()
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    try:
        tmp.mkdir(parents=True)
        for file, text in copies.items():
            (tmp / file).write_text(text, encoding="utf-8")
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except OSError as e:
        raise UserError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {dst}: {len(copies) - 1} project files with {len(EXERCISES)} exercises blank, and "
          f"EXERCISES.md; grade it with: python exercises.py grade {dst}")


def guide(lines):
    """EXERCISES.md: the exercises in teaching order, where each is, what the grader checks, how long."""
    total = sum(ex.minutes for ex in EXERCISES)
    needs = " ".join(f"`{script}` needs {', '.join(names)}." for script, names in SCRIPTS_NEED.items())
    text = [
        "# Exercises", "",
        (f"{len(EXERCISES)} exercises, in teaching order, about {total // 60} h {total % 60} min in all. "
         "Each is a block between `# ---- EXERCISE name` and `# ---- END EXERCISE ----`: replace its "
         "`raise NotImplementedError` with your code. The comment lines above it give the inputs and outputs "
         "with their shapes, and the paper's equation; the docstring says more. Everything outside "
         "the blocks is given and works."), "",
        ("Which script runs when: `baseline.py` and `eval.py` run from the start (they use none of the "
         f"exercises). {needs}"), "",
        ("Your teacher grades with `python exercises.py grade <this folder>`: one line per exercise (pass, "
         "fail with the first check that failed, or not implemented) and a score. The checks compare your "
         "function with properties and with an independent computation, on random inputs of several shapes "
         "and seeds; where it calls another exercise's function, the grader's own version stands in for that "
         "one. `--train` then runs your npc.py for one epoch on the embedded data."), "",
        "| # | exercise | where | about |", "|---|---|---|---|",
    ]
    for i, ex in enumerate(EXERCISES, 1):
        where = ", ".join(f"{file} `{function}`" for file, function in ex.where)
        text.append(f"| {i} | {ex.title} | {where} | {ex.minutes} min |")
    for i, ex in enumerate(EXERCISES, 1):
        places = [f"`{file}`, `{function}()`, line {lines[(file, function)]}" for file, function in ex.where]
        text += ["", f"## {i}. {ex.title} (`{ex.name}`, about {ex.minutes} min)", "",
                 f"- **Paper:** {ex.paper}.", f"- **Where:** {'; '.join(places)}.",
                 f"- **The grader checks:** {ex.checks}."]
    return "\n".join(text) + "\n"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    parser = OneLineParser(prog="exercises.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make_cmd = commands.add_parser("make", help="write the student copy into DIR, a new or empty folder")
    make_cmd.add_argument("dir", metavar="DIR")
    grade_cmd = commands.add_parser("grade", help="grade the exercises of the copy in DIR")
    grade_cmd.add_argument("dir", metavar="DIR")
    grade_cmd.add_argument("--train", action="store_true", help="then DIR's npc.py, one epoch, embedded data")
    grade_cmd.add_argument("--data-root", default=str(ROOT / "data" / "embedded"),
                           help="embedded data for --train (default: this project's data/embedded)")
    args = parser.parse_args(argv)
    try:
        if args.command == "make":
            return make(args.dir)
        folder = Path(args.dir)
        missing = [f for f in FILES if f.endswith(".py") and not (folder / f).is_file()]
        if missing:
            raise UserError(f"{folder} is not a copy of the project: it has no {', '.join(missing)}")
        t0 = time.time()
        results = grade(folder)
        for i, (ex, verdict, detail) in enumerate(results, 1):
            files = ", ".join(file for file, _ in ex.where)
            print(f"{i:2d} {ex.name:<18} {files:<16} {verdict}" + (f": {detail}" if detail else ""))
        passed = sum(verdict == "pass" for _, verdict, _ in results)
        print(f"score {passed}/{len(results)}  ({time.time() - t0:.0f} s)", flush=True)
        code = 0 if passed == len(results) else 1
        return train(folder.resolve(), args.data_root, results) or code if args.train else code
    except UserError as e:
        print(f"exercises.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
