"""Scale and survival: two processes under torchrun (gloo, CPU) match one process of the same global batch,
and a run killed with SIGKILL mid-training and resumed ends exactly where an uninterrupted run ends, and the
passes the processes share give what one process gives."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

RUN = ["--noise", "0.4", "--epochs", "2", "--batch-size", "32", "--warmup", "3", "--device", "cpu"]
# two epochs, and the kill in the second: per-sample statistics, a GMM and a partition every epoch (the resume
# is runs.resume, which every script shares)
SCRIPTS = ["sdd.py"]
# under two processes for one epoch: open_clip's ClipLoss; a memory bank; eps, concepts and completion
ONE_EPOCH = ["baseline.py", "npc.py", "nlip.py"]
STATS = {"dropped", "w_con_auc", "w_sig_mean", "eps_auc", "completed", "lm"}  # of all pairs; NPC's w: below
JUMP = 1 - math.tanh(1)  # NPC's w = tanh(r) below r = 1 and 1 from there: a step of 0.238 at r = 1
LOSS_MAX = 2 * 15 + math.log(32)  # a pair's InfoNCE among 32 at logit scale s (14.2 here): below 2s + log 32


def _npc_weights_match(h1, h2):
    """NPC's weight statistics of one epoch, one process (h1) against two (h2); -> the loss's tolerance.
    r moves with the order of the sums (measured: at most 3.7e-6 per pair, 2026-12-03), so a pair with r that
    close to 1 may take the other side of the step (CI saw one of 1,184 do so). w_mean + JUMP * w_below_1 has
    no step there and must agree tightly; w_noisy and the loss may move by the step of each pair that changed
    side (those w_below_1 shows, and one more that a change the other way may hide)."""
    n, n_noisy = h1["pairs"], h1["noisy_pairs"]
    assert (h2["pairs"], h2["noisy_pairs"]) == (n, n_noisy)
    sides = round(abs(h2["w_below_1"] - h1["w_below_1"]) * n) + 1
    assert sides <= 12  # 1% of the pairs: 25 of them have |r - 1| < 1e-4
    smooth1, smooth2 = (h["w_mean"] + JUMP * h["w_below_1"] for h in (h1, h2))
    assert smooth2 == pytest.approx(smooth1, rel=1e-4)
    assert h2["w_noisy"] == pytest.approx(h1["w_noisy"], rel=1e-4, abs=sides * JUMP / n_noisy)
    return sides * JUMP * LOSS_MAX / n


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def odd(embedded, tmp_path_factory):
    """The test data less one train, dev and test image: 239, 99 and 99 images, so that features shared
    between two processes take the gather's padding path."""
    root = tmp_path_factory.mktemp("odd")
    shutil.copytree(embedded, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("image-cache", "noise"))
    index = json.loads((root / "dataset_embedded.json").read_text())
    drop = {split: next(im["filename"] for im in index["images"] if im["split"] == split)
            for split in ("train", "val", "test")}
    index["images"] = [im for im in index["images"] if im["filename"] not in drop.values()]
    (root / "dataset_embedded.json").write_text(json.dumps(index))
    return root


def _argv(script, root):
    """RUN; one epoch for baseline.py, npc.py and nlip.py, and NLIP from the tiny pre-trained CLIP with eps
    and completion at once."""
    nlip = ["--pretrained", root / "nc-tiny-pretrained.pt", "--warmup-epochs", "0", "--min-count", "2"]
    epochs = "1" if script in ONE_EPOCH else "2"
    return RUN[:2] + ["--epochs", epochs] + RUN[4:] + (nlip if script == "nlip.py" else [])


@pytest.fixture(scope="module")
def single(odd, tmp_path_factory):
    """script -> out_dir of one uninterrupted single-process run (the reference of both tests)."""
    runs = {}
    for script in SCRIPTS + ONE_EPOCH:
        runs[script] = out = tmp_path_factory.mktemp(script.split(".")[0])
        p = run_script(script, "--data-root", odd, "--out-dir", out, *_argv(script, odd))
        assert p.returncode == 0, p.stderr
    return runs


@pytest.mark.parametrize("script", SCRIPTS + ONE_EPOCH)
def test_two_processes_match_one_process_of_the_same_global_batch(script, single, odd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / script), "--data-root", str(odd), "--out-dir", str(tmp_path),
            *map(str, _argv(script, odd))]
    p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = _results(single[script]), _results(tmp_path)
    # 16 pairs a process, negatives gathered
    for h1, h2 in zip(one["history"][1:], two["history"][1:], strict=True):
        loss_tol = 0.0
        if "w_below_1" in h1:
            loss_tol = _npc_weights_match(h1, h2)
        assert h2.get("loss", h2.get("nitc")) == pytest.approx(h1.get("loss", h1.get("nitc")), rel=1e-4,
                                                               abs=loss_tol)
        # the statistics of all pairs (SDD's before its GMM, NLIP's scan; NPC's weights above)
        for k in STATS & set(h1):
            assert h2[k] == pytest.approx(h1[k], rel=1e-4), k
    w1, w2 = (torch.load(out / "last.pt", weights_only=True)["model"] for out in (single[script], tmp_path))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 5e-4  # measured 5e-5; local negatives: 8e-3
    # 100 test images: a rank may flip
    assert two["test"]["rsum"] == pytest.approx(one["test"]["rsum"], abs=2.0)
    epochs = one["args"]["epochs"]
    last = [line for line in (tmp_path / "log.txt").read_text().splitlines()
            if line.startswith(f"epoch {epochs}/{epochs} ") and " dev i2t" in line]
    assert len(last) == 1  # rank 0 alone logs


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_mid_training_then_resume_ends_like_an_uninterrupted_run(script, single, odd, tmp_path):
    argv = [sys.executable, str(ROOT / script), "--data-root", str(odd), "--out-dir", str(tmp_path), *RUN]
    p = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)  # during epoch 2: last.pt holds epoch 1
    assert p.wait() == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0
    resumed = subprocess.run(argv + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    want, got = _results(single[script]), _results(tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert "resumed from" in log and "memory bank rebuilt" in log  # SDD's look-ahead bank is not saved
    thresholds = [line for line in log.splitlines() if line.startswith("thresholds:")]
    assert len(thresholds) == 2 and thresholds[0] == thresholds[1]  # read again off the starting model
    assert got["test"] == want["test"]  # exactly
    assert [h["dev"] for h in got["history"]] == [h["dev"] for h in want["history"]]
    assert [h["loss"] for h in got["history"][1:]] == [h["loss"] for h in want["history"][1:]]


def test_the_shared_passes_equal_one_process(embedded, tmp_path):
    """NPC's neighbour search and NLIP's caption writing, shared between 2 processes and gathered, equal one
    process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for out, launch in ((one, []), (two, torchrun)):
        out.mkdir()
        argv = [sys.executable, *launch, str(ROOT / "tests" / "sharded_passes.py"), str(embedded), str(out)]
        p = subprocess.run(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=300, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
    want = torch.load(one / "rank0.pt", weights_only=False)
    assert len(want["beam1"]) == len(want["beam2"]) == 10 and any(want["beam1"])
    for rank in (0, 1):
        got = torch.load(two / f"rank{rank}.pt", weights_only=False)
        for k in ("bank_img", "bank_txt", "nearest", "sdd_bank_img", "sdd_bank_txt"):
            assert np.array_equal(got[k], want[k]), k
        assert got["beam1"] == want["beam1"] and got["beam2"] == want["beam2"]
