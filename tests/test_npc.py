"""NPC: the weight, the memory bank, the in-place look-ahead copy, and npc.py end to end."""
import copy
import importlib
import json
import math
import types

import numpy as np
import pytest
import torch
from conftest import run_script, stop_after_first_epoch

import common
import data
import npc
import runs


def test_weight_is_below_1_when_the_look_ahead_raises_the_memory_loss_and_1_when_it_lowers_it():
    before = torch.tensor([2.0, 2.0, 1.0, 3.0])
    # raised (r = 0.5), lowered (r = 2), unchanged (r = 1), raised a little
    after = torch.tensor([4.0, 1.0, 1.0, 3.3])
    w = npc.npc_weight(before, before, after, after)
    assert w.tolist() == pytest.approx([math.tanh(0.5), 1.0, 1.0, math.tanh(3 / 3.3)])
    mixed = npc.npc_weight(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([4.0]))
    # r = (2 + 0.25) / 2 > 1: the image side outweighs the text side
    assert mixed.item() == pytest.approx(1.0)


def test_memory_bank_points_at_the_clean_set_and_finds_clean_pairs(embedded):
    weights = str(embedded / "nc-tiny-pretrained.pt")
    model, preprocess, tokenizer = common.load_model("nc-tiny", weights, torch.device("cpu"))
    pixels = data.Pixels(preprocess)
    train, is_noisy = data.noisy_train("embedded", embedded, 0.4, 0)
    args = types.SimpleNamespace(batch_size=48, seed=99, bank_threshold=0.9)
    img, txt = common.features(model, train, pixels, tokenizer, torch.device("cpu"))
    owner = torch.as_tensor(train.img_of_cap)
    scale = model.logit_scale.exp().item()
    bank_img, bank_txt, stats = npc.memory_bank(img, txt, owner, scale, is_noisy, args)
    # the clean set again, computed directly
    loss = common.pair_losses(img[owner], txt, scale, 48, 99)
    clean = set(np.flatnonzero(common.gmm_clean_prob(loss) > 0.9))
    assert len(bank_img) == len(bank_txt) == len(is_noisy)
    assert set(bank_img) <= clean and set(bank_txt) <= clean and stats["size"] == len(clean)
    assert stats["precision"] > 1 - is_noisy.mean() + 0.2  # far better than a random choice of pairs
    assert stats["auc"] > 0.8


def test_look_ahead_copy_takes_the_step_of_the_main_optimiser_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    opt = runs.optimizer(model, 1e-2, 0.2)
    siamese = copy.deepcopy(model)
    siamese_opt = runs.optimizer(siamese, 1.0, 0.2)  # a wrong lr, which the copy must replace
    x, state_ids = torch.randn(5, 4), []
    for _ in range(3):  # the main model moves on; A' is reset from it each time
        # what one more step of the main optimiser gives
        reference, reference_opt = copy.deepcopy((model, opt))
        npc.copy_into(siamese, siamese_opt, model, opt)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), siamese.parameters()))
        state_ids.append(sorted(id(t) for s in siamese_opt.state.values() for t in s.values()))
        runs.train_step(siamese, siamese_opt, siamese(x).square().mean())
        runs.train_step(reference, reference_opt, reference(x).square().mean())
        assert all(torch.allclose(p, q) for p, q in zip(reference.parameters(), siamese.parameters()))
        runs.train_step(model, opt, (model(x) - 1).square().mean())
    # A' reuses its state: 3 tensors per weight with a gradient
    assert state_ids[1] == state_ids[2] and len(state_ids[1]) == 3 * 4


RUN = ["--noise", "0.4", "--epochs", "2", "--batch-size", "48", "--warmup", "5", "--lr", "5e-4"]


@pytest.fixture(scope="module")
def default_run(embedded, tmp_path_factory):
    """The out-dir of a 2-epoch npc.py run at its defaults: the paper's loss, the bank rebuilt each epoch."""
    out = tmp_path_factory.mktemp("npc")
    p = run_script("npc.py", "--data-root", embedded, "--out-dir", out, *RUN)
    assert p.returncode == 0, p.stderr
    return out


def test_npc_runs_end_to_end_and_weights_noisy_pairs_down(default_run):
    tmp_path = default_run
    log = (tmp_path / "log.txt").read_text()
    assert "memory bank: clean set" in log and "epoch 2/2" in log and "test (best dev epoch" in log
    assert "epoch 1/2  memory bank: the starting model's" in log
    assert "epoch 2/2  memory bank: rebuilt from the model of epoch 1" in log  # by default (before: fixed)
    res = json.loads((tmp_path / "results.json").read_text())
    bank = res["memory_bank"]
    assert res["method"] == "npc" and bank["precision"] > 0.8
    # the memory pairs: the text side of a clean-set pair is itself, the image side a caption of its image
    assert "of the memory pairs are the pair itself" in log
    assert 0.2 < bank["self"] < bank["same_image"] <= 1 and bank["noisy_own_image"] > 0.5
    for h in res["history"][1:]:
        assert 0 < h["w_mean"] <= 1 and h["w_noisy"] < h["w_clean"]
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


def test_official_loss_trains_otherwise_and_resume_rebuilds_the_fixed_bank(embedded, default_run, tmp_path):
    argv = ["--data-root", embedded, *RUN, "--official-loss", "--fixed-bank"]
    stop_after_first_epoch("npc.py", tmp_path, *argv)
    p = run_script("npc.py", *argv, "--out-dir", tmp_path, "--resume")
    assert p.returncode == 0, p.stderr
    log = (tmp_path / "log.txt").read_text()
    assert log.count("memory bank: clean set") == 2 and "memory bank rebuilt" in log  # --fixed-bank: no other
    banks = [line for line in log.splitlines() if line.startswith("memory bank: clean set")]
    assert banks[0] == banks[1]  # rebuilt identically from the starting model
    assert "epoch 2/2  memory bank: the starting model's" in log
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "npc-official-loss" and [h["epoch"] for h in res["history"]] == [0, 1, 2]
    # the same starting bank as the default run, but other weights: the collapsed w and the
    # constant memory term
    default_log = (default_run / "log.txt").read_text().splitlines()
    assert banks[0] == next(line for line in default_log if line.startswith("memory bank"))
    official, paper = (torch.load(out / "last.pt", weights_only=True)["model"]
                       for out in (tmp_path, default_run))
    assert max((official[k] - paper[k]).abs().max().item() for k in paper) > 1e-2
    refused = run_script("npc.py", "--data-root", embedded, "--out-dir", tmp_path, "--batch-size", "48",
                         "--resume")
    want = (f"error: {tmp_path}/last.pt is a npc-official-loss checkpoint, "
            "not npc: resume it with its own script and flags")
    assert refused.returncode == 2 and refused.stderr.strip() == want


def test_no_lookahead_weighs_1_the_bank_is_rebuilt_and_a_small_clean_set_warns(embedded, tmp_path):
    p = run_script("npc.py", "--data-root", embedded, "--out-dir", tmp_path, *RUN, "--no-lookahead",
                   "--bank-threshold", "0.98")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "npc-no-lookahead"
    assert all(h["w_mean"] == 1.0 and h["w_below_1"] == 0.0 for h in res["history"][1:])
    log = (tmp_path / "log.txt").read_text()
    assert log.count("memory bank: clean set") == 2  # the starting model's, then epoch 2's
    first, second = (h["memory_bank"] for h in res["history"][1:])
    assert first == res["memory_bank"] and second != first  # rebuilt from the model after epoch 1
    # a clean set under half the GMM's expected clean pairs (here by the strict threshold) warns
    assert first["size"] < 0.5 * first["expected_clean"] and "memory bank: warning: the clean set is" in log
    both = run_script("npc.py", "--data-root", embedded, "--out-dir", tmp_path / "both", "--no-lookahead",
                      "--official-loss")
    want = "error: --official-loss and --no-lookahead together train plain InfoNCE: give one"
    assert both.returncode == 2 and both.stderr.strip() == want


def test_a_refreshed_bank_reaches_the_batches_whatever_the_workers(embedded, default_run, tmp_path):
    """The bank is rebuilt in the main process; persistent DataLoader workers hold their own copy
    of the dataset, so before the fix epoch 2 at --workers 2 served the starting model's bank. The batches
    must carry the refreshed bank's memory pairs, and 2 workers must train as 0 (default_run) do."""
    runs_ = {}
    for workers, out in ((0, default_run), (2, tmp_path / "workers2")):
        if workers:
            p = run_script("npc.py", "--data-root", embedded, "--out-dir", out, *RUN, "--workers", workers)
            assert p.returncode == 0, p.stderr
        runs_[workers] = json.loads((out / "results.json").read_text())["history"][1:]
        assert "epoch 2/2  memory bank: rebuilt from the model of epoch 1" in (out / "log.txt").read_text()
    assert runs_[0][1]["memory_bank"] != runs_[0][0]["memory_bank"]  # epoch 2 has another bank
    for at_0, at_2 in zip(runs_[0], runs_[2], strict=True):
        assert at_2["memory_from_bank"] == 1.0  # every memory pair served is the current bank's
        assert at_2["memory_bank"] == at_0["memory_bank"]
        for key in ("loss", "w_mean", "w_std", "w_below_1", "memory_noisy"):
            assert at_2[key] == pytest.approx(at_0[key], rel=1e-5, abs=1e-7), key


def test_a_resume_rebuilds_the_bank_as_the_uninterrupted_run_did(embedded, default_run, tmp_path):
    """Killed after epoch 1 and resumed: the starting model's bank, then the resumed model's, as default_run
    had them, so the run ends as default_run did."""
    argv = ["--data-root", embedded, *RUN]
    stop_after_first_epoch("npc.py", tmp_path, *argv)
    p = run_script("npc.py", *argv, "--out-dir", tmp_path, "--resume")
    assert p.returncode == 0, p.stderr
    want, got = (json.loads((out / "results.json").read_text()) for out in (default_run, tmp_path))
    assert got["history"][2]["memory_bank"] == want["history"][2]["memory_bank"] != want["memory_bank"]
    for key in ("loss", "w_mean", "dev"):
        assert got["history"][2][key] == want["history"][2][key], key
    assert got["test"] == want["test"]


def test_an_empty_memory_bank_is_a_one_line_error(embedded, tmp_path):
    p = run_script("npc.py", "--data-root", embedded, "--out-dir", tmp_path, "--bank-threshold", "1")
    want = "error: the memory bank is empty: no pair has clean posterior > 1.0"
    assert p.returncode == 2 and p.stderr.strip() == want


def test_at_lr_0_every_weight_is_exactly_1_also_under_bf16_autocast(embedded, tmp_path):
    """lr 0: the look-ahead leaves A' equal to A, so the memory losses before and after it (fp32) are equal,
    r = 1 and w = 1 for every pair, whatever the autocast of the training forwards."""
    p = run_script("npc.py", "--data-root", embedded, "--out-dir", tmp_path, "--epochs", "1",
                   "--batch-size", "32", "--lr", "0", "--precision", "bf16", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    epoch = json.loads((tmp_path / "results.json").read_text())["history"][1]
    assert epoch["w_mean"] == 1.0 and epoch["w_std"] == 0.0 and epoch["w_below_1"] == 0.0
    assert "no training epoch beat the starting model's dev rSum" in p.stdout  # lr 0 trains nothing


@pytest.mark.parametrize("script", ["npc", "sdd"])
def test_memory_losses_are_fp32_under_bf16_autocast(script):
    """The memory losses compared across the look-ahead come out of an fp32 forward even inside bf16 autocast,
    where the same forward gives other values. (At lr 0 on the CPU the earlier bf16 form also gave r = 1
    exactly: CPU kernels round a row the same whatever the batch, so the lr-0 test above cannot tell the two
    forms apart.)"""
    memory_losses = importlib.import_module(script).memory_losses
    torch.manual_seed(0)
    model = common.load_model("nc-tiny", "none", torch.device("cpu"), log=lambda line: None)[0]
    images, tokens = torch.randn(16, 3, 64, 64), torch.randint(1, 49407, (16, 32))  # 2B = 16 memory pairs
    want = memory_losses(model, images, tokens)
    with torch.autocast("cpu", torch.bfloat16):
        got = memory_losses(model, images, tokens)
        with torch.no_grad():
            img, txt, scale = model(images, tokens)
            bf16 = common.info_nce(img[:8], txt[:8], scale)
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    assert not torch.allclose(bf16.float(), want[0], rtol=1e-4, atol=0)  # bf16 would have changed them
