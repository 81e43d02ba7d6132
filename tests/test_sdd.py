"""SDD: the self-drop, the confidence and significance weights, the threshold rule, and sdd.py end to end."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import npc
import sdd


def _mixture(n_clean=600, n_noisy=400, seed=0):
    rng = np.random.default_rng(seed)
    cos = np.concatenate([rng.normal(0.7, 0.1, n_clean), rng.normal(0.0, 0.2, n_noisy)])
    return cos, np.arange(n_clean + n_noisy) >= n_clean  # cosines, is_noisy


def test_dual_weight_on_hand_made_and_random_cases():
    before = torch.tensor([2.0, 2.0, 1.0])
    after = torch.tensor([1.0, 4.0, 1.0])  # lowered (r = 2), raised (r = 0.5), unchanged (r = 1)
    w_con = torch.tensor([1.0, 0.5, 0.2])
    w_sig, w = sdd.dual_weight(w_con, before, before, after, after)
    assert w_sig.tolist() == pytest.approx([1.0, math.tanh(0.5), 1.0])
    assert w.tolist() == pytest.approx([1.0, 0.5 * math.tanh(0.5), 0.2])
    g = torch.Generator().manual_seed(0)
    w_con, l_I, l_T, a_I, a_T = (torch.rand(300, generator=g) + 0.05 for _ in range(5))
    w_sig, w = sdd.dual_weight(w_con, l_I, l_T, a_I, a_T)
    assert torch.equal(w_sig, npc.npc_weight(l_I, l_T, a_I, a_T))  # the significance weight is NPC's weight
    for i in range(300):
        r = (l_I[i].item() / a_I[i].item() + l_T[i].item() / a_T[i].item()) / 2
        assert w[i].item() == pytest.approx((math.tanh(r) if r < 1 else 1.0) * w_con[i].item(), rel=1e-5)


def test_auto_thresholds_are_mu_minus_3_sd_and_mu_of_matched_pairs():
    cos = np.random.default_rng(0).normal(0.7, 0.1, 5000)
    alpha, beta = sdd.auto_thresholds(cos)
    assert alpha == pytest.approx(cos.mean() - 3 * cos.std()) and beta == pytest.approx(cos.mean())
    assert alpha == pytest.approx(0.4, abs=0.01) and beta == pytest.approx(0.7, abs=0.005)
    assert sdd.threshold("alpha", "auto", 0.41) == 0.41 and sdd.threshold("alpha", "0.2", 0.41) == 0.2


def test_sdd_runs_end_to_end_and_drops_mostly_noisy_pairs(embedded, tmp_path):
    # (the resume of a run killed in epoch 2 is in test_scale.py: it ends exactly as an uninterrupted run)
    argv = ["--data-root", embedded, "--noise", "0.4", "--batch-size", "48", "--warmup", "5", "--epochs", "2"]
    p = run_script("sdd.py", *argv, "--out-dir", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "; auto would give" in p.stdout  # the thresholds used beside those auto would give
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "sdd" and [h["epoch"] for h in res["history"]] == [0, 1, 2]
    for h in res["history"][1:]:
        # dropped pairs are mostly noisy, far above chance
        assert h["drop_precision"] > 0.8 > res["noise_rate"]
        assert h["w_con_auc"] > 0.8 and 0 < h["w_sig_mean"] <= 1
        parts = h["partitions"]
        assert parts["noisy"] == h["dropped"]
        trained = parts["vague"] + parts["clean_insignificant"] + parts["clean_significant"]
        assert trained == (1200 - h["dropped"]) // 48 * 48  # every kept pair of the full batches, once
    assert 0 < res["alpha"] < res["beta"] < 1


def test_bad_thresholds_are_one_line_errors(embedded, tmp_path):
    p = run_script("sdd.py", "--data-root", embedded, "--out-dir", tmp_path, "--alpha", "low")
    assert p.returncode == 2 and p.stderr.strip() == "error: --alpha must be a number or auto, got low"
    p = run_script("sdd.py", "--data-root", embedded, "--out-dir", tmp_path, "--beta", "1.5")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "the memory bank is empty" in p.stderr and len(lines) == 1


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.skipif(HAS_MATPLOTLIB,
                    reason="matplotlib is installed here: --plot works (the next test draws a plot)")
def test_plot_without_matplotlib_is_a_one_line_error(embedded, tmp_path):
    p = run_script("sdd.py", "--data-root", embedded, "--out-dir", tmp_path, "--plot", "--epochs", "1",
                   "--batch-size", "48")
    assert p.returncode == 2 and p.stderr.strip() == "error: --plot needs matplotlib (pip install matplotlib)"


@pytest.mark.skipif(not HAS_MATPLOTLIB,
                    reason="matplotlib is not a dependency of the project and is not installed here")
def test_plot_draws_the_histograms(tmp_path):
    rng = np.random.default_rng(0)
    is_noisy = rng.random(2000) < 0.4
    cos = np.where(is_noisy, rng.normal(0.1, 0.05, 2000), rng.normal(0.3, 0.05, 2000))
    sdd.plot(tmp_path / "p.png", cos, is_noisy, 0.15, "test")
    png = tmp_path / "p.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_at_lr_0_every_significance_weight_is_exactly_1_also_under_bf16_autocast(embedded, tmp_path):
    p = run_script("sdd.py", "--data-root", embedded, "--out-dir", tmp_path, "--epochs", "1",
                   "--batch-size", "32", "--lr", "0", "--precision", "bf16", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    epoch = json.loads((tmp_path / "results.json").read_text())["history"][1]
    assert epoch["w_sig_mean"] == 1.0 and epoch["partitions"]["clean_insignificant"] == 0


def test_the_bank_and_the_look_ahead_copy_written_out_again_are_npcs():
    """sdd.py repeats NPC's neighbour search, memory-pair dataset and in-place copy so that it reads alone;
    the copies must stay NPC's (the NPC tests check NPC's against brute force and against the main
    optimiser)."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(150, 8, generator=g), dim=1)
    pool, owner = np.flatnonzero(torch.rand(150, generator=g).numpy() > 0.6), torch.arange(150) // 5
    for got, want in zip(sdd.neighbours(img, txt, owner, pool), npc.neighbours(img, txt, owner, pool),
                         strict=True):
        assert np.array_equal(got, want)
    pairs = [(torch.full((2,), float(k)), torch.tensor([k]), k) for k in range(6)]
    bank_img, bank_txt = np.array([1, 0, 3, 2, 5, 4]), np.array([2, 2, 2, 5, 5, 5])
    sdd_pairs = sdd.WithMemory(pairs, bank_img, bank_txt)
    npc_pairs = npc.WithMemory(pairs, bank_img, bank_txt)
    assert all(str(sdd_pairs[k]) == str(npc_pairs[k]) for k in range(6))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    copies = []
    for module in (npc, sdd):
        siamese = torch.nn.Linear(4, 3)
        siamese_opt = torch.optim.AdamW(siamese.parameters(), lr=0.5)
        module.copy_into(siamese, siamese_opt, model, opt)
        copies.append((siamese.state_dict(), siamese_opt.state_dict()))
    assert str(copies[0]) == str(copies[1]) and torch.equal(copies[1][0]["weight"], model.weight)
