"""The scripts end to end: a short fine-tune that improves on its start, resume, eval.py, and bad input."""
import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_script

import common
import data
import runs

FAST = ["--epochs", "2", "--batch-size", "48", "--warmup", "5", "--lr", "5e-4"]


@pytest.fixture(scope="module")
def finished(embedded, tmp_path_factory):
    """A complete 2-epoch baseline run on clean data: (out_dir, results)."""
    out = tmp_path_factory.mktemp("run")
    p = run_script("baseline.py", "--data-root", embedded, "--noise", "0", "--out-dir", out, *FAST)
    assert p.returncode == 0, p.stderr
    return out, json.loads((out / "results.json").read_text())


def test_baseline_improves_recall_over_its_start(finished, embedded):
    out, res = finished
    log = (out / "log.txt").read_text()
    assert "start: dev" in log and "epoch 2/2" in log and "test (best dev epoch" in log
    start, epochs = res["history"][0], res["history"][1:]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert max(h["dev"]["rsum"] for h in epochs) > start["dev"]["rsum"] + 10
    zero_shot = run_script("eval.py", "--data-root", embedded, "--json", out / "zs.json")
    assert zero_shot.returncode == 0, zero_shot.stderr
    assert res["test"]["rsum"] > json.loads((out / "zs.json").read_text())["rsum"] + 10
    again = run_script("eval.py", "--checkpoint", out / "best.pt", "--json", out / "best.json")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "best.json").read_text())["rsum"] == pytest.approx(res["test"]["rsum"], abs=1e-6)


def test_clean_only_trains_on_the_clean_pairs(embedded, tmp_path):
    p = run_script("baseline.py", "--data-root", embedded, "--noise", "0.4", "--clean-only",
                   "--out-dir", tmp_path, "--epochs", "1", "--batch-size", "48", "--warmup", "5")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "baseline-clean" and 0.35 < res["noise_rate"] < 0.41
    assert res["history"][1]["noisy_trained"] == 0  # none of the pairs trained on (without the Subset: 0.4)


def _fails_in_one_line(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def fails_here(capsys, monkeypatch, tmp_path):
    """fails_here(script, *argv, words=[...]): the script's main, in this process (its code path is the
    command's: runs.run), ends with exit status 2 and one error line holding the words, and writes no results.
    -> stdout"""
    monkeypatch.chdir(tmp_path)  # the default data/embedded and out/ are never the repository's

    def check(script, *argv, words=()):
        monkeypatch.setattr("sys.argv", [script, *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            runs.run(importlib.import_module(script[:-3]).main)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        for w in words:
            assert w in lines[0], lines[0]
        assert not list(tmp_path.rglob("results.json"))
        return out
    return check


def test_bad_input_from_the_command_line_is_one_line_and_exit_2(embedded, tmp_path):
    p = run_script("baseline.py", "--data-root", embedded, "--noise", "1.2", "--out-dir", tmp_path)
    _fails_in_one_line(p, "--noise must be in [0, 1)")
    p = run_script("npc.py", "--dataset", "imagenet")
    _fails_in_one_line(p, "--dataset", "invalid choice: 'imagenet'")


@pytest.mark.parametrize("argv,words", [
    (["--dataset", "f30k", "--data-root", "/no/such/folder"], ["/no/such/folder", "does not exist"]),
    (["--dataset", "f30k"], ["--data-root is required"]),
    (["--noise", "1.2"], ["--noise must be in [0, 1)"]),
    (["--noise", "-0.1"], ["--noise must be in [0, 1)"]),
    (["--pretrained", "/no/such/weights.pt"], ["neither a file nor a tag"]),
])
def test_bad_input_gives_one_line_error(argv, words, embedded, fails_here):
    root = [] if "--data-root" in argv or "--dataset" in argv else ["--data-root", embedded]
    fails_here("baseline.py", "--out-dir", "o", *root, *argv, words=words)


@pytest.mark.parametrize("script", ["baseline.py", "npc.py", "sdd.py", "nlip.py", "eval.py", "bench.py"])
def test_unknown_dataset_or_bad_flag_value_is_one_line(script, fails_here):
    fails_here(script, "--dataset", "imagenet", words=["--dataset", "invalid choice: 'imagenet'"])
    flag = "--split" if script == "eval.py" else "--noise"
    fails_here(script, "--device", "cpu", flag, "x", words=["invalid"])


@pytest.mark.parametrize("script", ["baseline.py", "npc.py"])
def test_a_diverged_run_stops_in_one_line_before_writing_a_checkpoint(script, embedded, fails_here, tmp_path):
    fails_here(script, "--data-root", embedded, "--out-dir", "o", "--lr", "1e6", "--epochs", "1",
               "--batch-size", "48", words=["the loss is", "at optimiser step", "(lr ", "diverged"])
    assert not (tmp_path / "o" / "best.pt").exists() and not (tmp_path / "o" / "last.pt").exists()


def test_missing_and_corrupt_images_give_one_line_error(embedded, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(embedded, root)
    (root / "images" / "train_00003.png").write_bytes(b"\x89PNG broken")
    _fails_in_one_line(run_script("baseline.py", "--data-root", root, "--out-dir", tmp_path / "o", *FAST),
                       "cannot read image", "train_00003.png")
    shutil.copy(embedded / "images" / "train_00003.png", root / "images" / "train_00003.png")
    (root / "images" / "dev_00001.png").unlink()
    _fails_in_one_line(run_script("baseline.py", "--data-root", root, "--out-dir", tmp_path / "o", *FAST),
                       "missing", "dev_00001.png")


@pytest.mark.parametrize("script,argv,words", [
    ("baseline.py", ["--clean-only"], ["last.pt is a baseline checkpoint, not baseline-clean"]),
    ("npc.py", [], ["last.pt is a baseline checkpoint, not npc"]),
    ("sdd.py", [], ["last.pt is a baseline checkpoint, not sdd"]),
    ("nlip.py", [], ["last.pt is a baseline checkpoint, not nlip"]),
    ("baseline.py", ["--model", "ViT-B-32"], ["--resume: --model is ViT-B-32 but the run in", "has nc-tiny"]),
    ("baseline.py", ["--noise", "0.4"], ["--resume: --noise is 0.4 but the run in", "has 0.0"]),
    ("baseline.py", ["--lr", "0.01"], ["--lr is 0.01", "has 0.0005"]),
    ("baseline.py", ["--batch-size", "8"], ["--batch-size is 8", "has 48"]),
    ("baseline.py", ["--epochs", "3"], ["--epochs is 3", "has 2"]),
    ("baseline.py", ["--seed", "1"], ["--seed is 1", "has 99"]),
    ("baseline.py", ["--noise-seed", "1"], ["--noise-seed is 1", "has 0"]),
    ("baseline.py", ["--wd", "0.1"], ["--wd is 0.1", "has 0.2"]),
    ("baseline.py", ["--precision", "bf16"], ["--precision is bf16", "has fp32"]),
])
def test_a_resume_must_match_the_run_it_continues(script, argv, words, finished, embedded, fails_here):
    out, _ = finished
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    fails_here(script, "--data-root", embedded, "--resume", "--out-dir", out, "--noise", "0", *FAST, *argv,
               words=words)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before  # nothing written


def test_a_finished_run_is_neither_resumed_nor_overwritten(finished, embedded, monkeypatch, capsys,
                                                           fails_here, tmp_path):
    out, _ = finished
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    # another data root is another run
    fails_here("baseline.py", "--data-root", tmp_path, "--resume", "--out-dir", out, "--noise", "0", *FAST,
               words=["--data-root is", str(tmp_path), "but the run"])
    # the same flags: finished, exit 0, nothing rewritten (how a run goes, here its workers, may change)
    argv = ["--data-root", str(embedded), "--resume", "--out-dir", str(out), "--noise", "0", *FAST,
            "--workers", "1"]
    monkeypatch.setattr("sys.argv", ["baseline.py", *argv])
    with pytest.raises(SystemExit) as e:
        runs.run(importlib.import_module("baseline").main)
    assert e.value.code == 0 and "holds a finished run" in capsys.readouterr().out
    # a fresh run into it, and both --resume and --overwrite, are refused
    fails_here("baseline.py", "--data-root", embedded, "--out-dir", out,
               words=["already holds a run", "--overwrite"])
    fails_here("baseline.py", "--data-root", embedded, "--out-dir", out, "--resume", "--overwrite",
               words=["give one"])
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


def test_overwrite_sets_the_old_run_aside_until_the_new_one_has_an_epoch(tmp_path):
    names = ("last.pt", "best.pt", "results.json", "log.txt", "similarity_epoch1.png", "last.pt.123.tmp")
    for name in (*names, "notes.md"):
        (tmp_path / name).write_text("old")
    args = argparse.Namespace(out_dir=str(tmp_path), overwrite=False)
    with pytest.raises(data.UserError, match="already holds a run"):
        runs.start_fresh(args)
    assert len(list(tmp_path.iterdir())) == 7
    runs.start_fresh(argparse.Namespace(out_dir=str(tmp_path), overwrite=True))
    assert sorted(f.name for f in tmp_path.iterdir()) == [".overwritten", "notes.md"]
    assert sorted(f.name for f in (tmp_path / ".overwritten").iterdir()) == sorted(names)
    (tmp_path / "log.txt").write_text("the new run, which failed before its first checkpoint")
    runs.put_back(tmp_path)  # what release() does at exit, and a later run after a SIGKILL
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted((*names, "notes.md"))
    assert all(f.read_text() == "old" for f in tmp_path.iterdir())
    for name in names:
        (tmp_path / name).unlink()
    (tmp_path / "log.txt").write_text("a run that stopped before its first checkpoint")
    runs.start_fresh(args)  # its log holds no result: a fresh run starts a fresh log
    assert [f.name for f in tmp_path.iterdir()] == ["notes.md"]


def test_overwrite_checks_every_input_before_it_replaces_a_finished_run(finished, embedded, fails_here,
                                                                        tmp_path_factory):
    out = tmp_path_factory.mktemp("overwritten") / "run"
    shutil.copytree(finished[0], out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    fails_here("baseline.py", "--data-root", embedded, "--out-dir", out, "--noise", "0", "--overwrite",
               "--pretrained", out / "missing.pt", words=["missing.pt"])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # no .lock, no new log.txt
    p = run_script("baseline.py", "--data-root", embedded, "--out-dir", out, "--overwrite", *FAST,
                   "--epochs", "1")
    assert p.returncode == 0, p.stderr
    foreign = {n for n in before if n not in ("best.pt", "last.pt", "log.txt", "results.json")}
    assert sorted(f.name for f in out.iterdir()) == sorted({"best.pt", "last.pt", "log.txt", "results.json",
                                                           *foreign})  # nothing set aside is left behind
    assert all((out / n).read_bytes() == before[n] for n in foreign)  # files the scripts never write are kept
    assert json.loads((out / "results.json").read_text())["args"]["epochs"] == 1


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(embedded, fails_here,
                                                                                     tmp_path_factory):
    out = tmp_path_factory.mktemp("locked")
    argv = [sys.executable, str(ROOT / "baseline.py"), "--data-root", str(embedded), "--out-dir", str(out),
            *FAST]
    first = subprocess.Popen(argv, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "log.txt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / ".lock").read_text().split()[0] == str(first.pid)
        fails_here("baseline.py", "--data-root", embedded, "--out-dir", out, *FAST,
                   words=[f"is in use by process {first.pid}", "another --out-dir"])
    finally:
        first.kill()
        first.wait()
    # the killed run's lock stays behind; the next run takes it over (and here stops at its weights)
    stdout = fails_here("baseline.py", "--data-root", embedded, "--out-dir", out, "--pretrained",
                        out / "missing.pt", words=["missing.pt"])
    assert f"taking over the lock of process {first.pid}" in stdout
    assert not (out / ".lock").exists()  # released at exit


@pytest.mark.parametrize("argv,words", [
    (["--batch-size", "1"], ["--batch-size must be 2 or more", "got 1"]),
    (["--batch-size", "0"], ["--batch-size must be 2 or more"]),
    (["--epochs", "0"], ["--epochs must be 1 or more"]),
    (["--lr=-1e-4"], ["--lr must be a finite number >= 0"]),
    (["--lr", "inf"], ["--lr must be a finite number >= 0", "got inf"]),
    (["--lr", "nan"], ["--lr must be a finite number >= 0"]),
    (["--warmup", "-1"], ["--warmup must be"]),
    (["--wd=-0.2"], ["--wd must be"]),
    (["--workers", "-2"], ["--workers must be"]),
    (["--seed", "-1"], ["--seed must be"]),
    (["--noise-seed", "-3"], ["--noise-seed must be"]),
    (["--seed", str(2**32)], ["--seed must be at most 2**32 - 1", "got 4294967296"]),
    (["--noise-seed", str(2**40)], ["--noise-seed must be at most 2**32 - 1"]),
    (["--device", "gpu0"], ["--device gpu0 is not a device name"]),
    (["--device", "cuda:7"], ["--device cuda:7: this machine has"]),
    (["--device", "mps"], ["--device mps: only cpu and cuda"]),
])
def test_shared_flags_out_of_range_are_one_line_before_any_work(argv, words, fails_here, tmp_path):
    assert fails_here("baseline.py", *argv, words=words) == ""
    assert list(tmp_path.iterdir()) == []  # no data generated, no out-dir made


def test_a_batch_the_processes_cannot_split_evenly_is_refused(fails_here, monkeypatch, tmp_path):
    """Under torchrun each of W processes takes batch / W pairs: --batch-size 33 on 2 trained 2 x 16 and
    recorded 33."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(common, "setup", lambda args: pytest.fail("not refused: it would wait for process 2"))
    fails_here("baseline.py", "--batch-size", "33", words=["--batch-size 33 does not split evenly over 2",
                                                           "multiple of 2"])
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_trains(embedded, tmp_path):
    """2**32 - 1 is accepted, and the generators seeded from it and the epoch do not overflow."""
    p = run_script("baseline.py", "--data-root", embedded, "--out-dir", tmp_path / "o", *FAST,
                   "--epochs", "1", "--seed", str(2**32 - 1))
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", ["npc.py", "sdd.py", "nlip.py"])
def test_every_script_checks_the_shared_flags(script, fails_here, tmp_path):
    assert fails_here(script, "--batch-size", "1", words=["--batch-size must be 2 or more"]) == ""
    assert fails_here(script, "--epochs", "0", words=["--epochs must be 1 or more"]) == ""
    assert list(tmp_path.iterdir()) == []


def test_an_out_dir_that_is_a_file_or_under_one_is_one_line(fails_here, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    fails_here("baseline.py", "--out-dir", tmp_path / "file", words=["is a file, not a folder"])
    fails_here("baseline.py", "--out-dir", tmp_path / "file" / "run", words=["is a file, not a folder"])
    if os.geteuid() != 0:  # root writes anywhere: the check can only be shown as another user
        (tmp_path / "locked").mkdir(mode=0o500)
        fails_here("baseline.py", "--out-dir", tmp_path / "locked" / "run", words=["is not writable"])


def test_a_data_root_that_is_a_file_is_one_line(fails_here, tmp_path):
    """Before: the embedded build's NotADirectoryError traceback, and 'does not exist' for real data."""
    (tmp_path / "file").write_text("not a folder")
    for script, rest in (("baseline.py", ["--out-dir", "o"]), ("eval.py", [])):
        fails_here(script, "--data-root", tmp_path / "file", *rest, words=["is a file, not a folder"])
        fails_here(script, "--data-root", tmp_path / "file" / "sub", *rest, words=["is a file, not a folder"])
    fails_here("baseline.py", "--dataset", "f30k", "--data-root", tmp_path / "file", "--out-dir", "o",
               words=["data folder", "is a file"])


def test_resume_with_no_checkpoint_and_bad_weights_or_checkpoints_are_one_line(finished, embedded, fails_here,
                                                                              tmp_path):
    out, _ = finished
    fails_here("baseline.py", "--data-root", embedded, "--resume", "--out-dir", "o",
               words=["last.pt not found"])
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--model", "ViT-B-32",
               words=["best.pt is a checkpoint of nc-tiny, not ViT-B-32"])
    (tmp_path / "notes.pt").write_text("not weights")
    for script, rest in (("baseline.py", ["--out-dir", "o"]), ("eval.py", [])):
        fails_here(script, "--data-root", embedded, "--pretrained", tmp_path / "notes.pt", *rest,
                   words=["cannot create nc-tiny from", "notes.pt: not a checkpoint"])  # was KeyError: 101
    fails_here("eval.py", "--checkpoint", tmp_path / "notes.pt", words=["cannot read checkpoint", "notes.pt"])


def test_eval_json_never_replaces_what_it_did_not_write(finished, fails_here, tmp_path):
    out, _ = finished
    best = (out / "best.pt").read_bytes()
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--json", out / "best.pt",
               words=["would replace a file of the run"])
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--json", out / "results.json",
               words=["would replace a file of the run"])
    (tmp_path / "notes.txt").write_text("my notes")
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--json", tmp_path / "notes.txt",
               words=["exists and is not an earlier eval.py JSON"])
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--json", tmp_path, words=["is a folder"])
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--json", tmp_path / "no" / "r.json",
               words=["does not exist"])
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--pretrained", out / "last.pt",
               words=["give one of --checkpoint and --pretrained"])
    assert (out / "best.pt").read_bytes() == best and (tmp_path / "notes.txt").read_text() == "my notes"


def test_the_zero_shot_recalls_are_the_same_under_1_and_2_threads_with_and_without_the_cache(embedded):
    """The README's zero-shot figure is one number: evaluation does not depend on the threads or the cache
    (the cache is built by the first run). The line names the weights' sha256, to tell builds apart."""
    lines = set()
    for threads in ("1", "2"):
        for cache in ([], ["--no-image-cache"]):
            p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--data-root", str(embedded), *cache],
                               capture_output=True, text=True, timeout=600, check=False,
                               env=dict(os.environ, OMP_NUM_THREADS=threads))
            assert p.returncode == 0, p.stderr
            lines.add(tuple(p.stdout.strip().splitlines()[-2:]))
    assert len(lines) == 1, lines
    (what, recalls), = lines
    sha = hashlib.sha256((embedded / "nc-tiny-pretrained.pt").read_bytes()).hexdigest()[:16]
    assert f"sha256 {sha}" in what and "rsum" in recalls


def test_a_step_that_makes_the_weights_not_finite_is_an_error_not_a_result(embedded, fails_here, tmp_path):
    """The one step's loss is finite; its update (lr 1e30) makes the features NaN. Before the check the run
    exited 0 with test rSum 0.0 and that model as best.pt."""
    fails_here("baseline.py", "--data-root", embedded, "--out-dir", tmp_path / "run", "--lr", "1e30",
               "--warmup", "0", "--batch-size", "1000", "--epochs", "1",
               words=["the model's features are not finite", "diverged"])
    assert not any((tmp_path / "run" / f).exists() for f in runs.RUN_FILES)


def test_the_defaults_taken_are_printed_and_the_workers_capped_at_the_cores(monkeypatch, capsys, tmp_path):
    import baseline
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "custom", "--data-root", "d", "--model", "nc-tiny"]
    monkeypatch.setattr("sys.argv", ["baseline.py", *argv])
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    args = baseline.parser.parse_args()
    assert args.workers == 2 and args.epochs == baseline.REAL["epochs"] and args.model == "nc-tiny"
    line = " ".join(capsys.readouterr().out.split())  # wrapped at 120 characters
    assert line.startswith("defaults of the real-data setting, which --dataset custom picks (not --model):")
    assert "'workers': 2" in line and "'model'" not in line  # what was given is no default


METHODS = ("baseline", "npc", "sdd", "nlip")


@pytest.mark.parametrize("script", METHODS)
def test_help_shows_the_defaults_of_both_settings_and_they_are_the_ones_taken(script, monkeypatch):
    module = importlib.import_module(script)
    text = " ".join(module.parser.format_help().split())  # argparse wraps the help text
    for key in ("model", "epochs", "batch_size", "lr", "warmup", "noise"):
        assert f"(embedded: {module.EMBEDDED[key]}; real data: {module.REAL[key]})" in text, key
    assert "(default: 99)" in text and "(default: None)" not in text  # --seed; a None default is a setting's
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--device", "cpu"])
    args = module.parser.parse_args()
    assert all(getattr(args, k) == v for k, v in module.EMBEDDED.items() if k != "workers")


@pytest.mark.parametrize("script", METHODS)
def test_no_method_file_imports_another(script):
    import ast
    tree = ast.parse((Path(__file__).parents[1] / f"{script}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert not imported & set(METHODS), imported & set(METHODS)


def test_sdd_alpha_above_beta_is_refused_before_any_work(embedded, fails_here, tmp_path):
    """With alpha above beta the bank (S > beta) holds pairs the self-drop (S <= alpha) removes. Before the
    check the run trained with it without a word."""
    fails_here("sdd.py", "--data-root", embedded, "--out-dir", tmp_path / "run", "--alpha", "0.6", "--beta",
               "0.3", words=["--alpha 0.6 is above --beta 0.3", "give alpha <= beta"])
    assert not (tmp_path / "run").exists()


def _copy_of(embedded, root, edit=None):
    """A data root reading the small embedded data through links, its index changed by edit(images) (a list
    of the JSON's image records); image files are linked one by one, so that one can be replaced."""
    index = json.loads((embedded / "dataset_embedded.json").read_text())
    if edit:
        edit(index["images"])
    (root / "images").mkdir(parents=True)
    (root / "dataset_embedded.json").write_text(json.dumps(index))
    (root / "nc-tiny-pretrained.pt").symlink_to(embedded / "nc-tiny-pretrained.pt")
    for f in (embedded / "images").iterdir():
        (root / "images" / f.name).symlink_to(f)
    return root


@pytest.mark.parametrize("cache", [[], ["--no-image-cache"]])
def test_a_broken_test_image_stops_the_run_before_its_first_step(cache, embedded, fails_here, tmp_path):
    root = _copy_of(embedded, tmp_path / "data")
    whole = (embedded / "images" / "test_00007.png").read_bytes()
    (root / "images" / "test_00007.png").unlink()
    (root / "images" / "test_00007.png").write_bytes(whole[:len(whole) // 2])  # its header opens
    fails_here("baseline.py", "--data-root", root, "--out-dir", "o", *cache, "--epochs", "1",
               "--batch-size", "48", words=["cannot read image", "test_00007.png"])
    assert not (tmp_path / "o" / "last.pt").exists()  # before the fix: after the last epoch, at the test


def test_a_test_split_too_small_to_rank_is_refused(embedded, fails_here, tmp_path):
    def ten_test_images(images):
        images[:] = [im for im in images if im["split"] != "test"] + [im for im in images
                                                                       if im["split"] == "test"][:10]
    root = _copy_of(embedded, tmp_path / "data", ten_test_images)
    words = ["the test split has 10 image(s)", "recall@10", "at least 11"]
    fails_here("eval.py", "--data-root", root, words=words)  # before the fix: rSum 600-like figures
    fails_here("baseline.py", "--data-root", root, "--out-dir", "o", "--epochs", "1", "--batch-size", "48",
               words=words)


def test_an_image_in_train_and_test_is_refused_and_a_repeated_image_is_named(embedded, fails_here, tmp_path):
    def leak(images):
        train = [im for im in images if im["split"] == "train"]
        dev = [im for im in images if im["split"] == "val"]
        images += [dict(train[0], split="test"), dict(train[1]), dict(dev[0], split="test")]
    root = _copy_of(embedded, tmp_path / "data", leak)
    out = fails_here("baseline.py", "--data-root", root, "--out-dir", "o", "--epochs", "1",
                     "--batch-size", "48", words=["1 image(s) of the test split are also in the train split",
                                                  "train_00000.png"])
    assert "warning: 1 image(s) of the train split are listed more than once, first: " in out
    assert "train_00001.png" in out and "in both the dev and the test split" in out
    assert not (tmp_path / "o" / "last.pt").exists()


@pytest.mark.parametrize("argv,words", [
    (["--lam", "0.5"], ["--lam does nothing here", "--warmup-epochs 1", "--epochs is 1"]),
    (["--learned-margin"], ["--learned-margin does nothing here"]),
    (["--replace-above=0.9"], ["--replace-above does nothing here"]),
    (["--concepts", "500"], ["--concepts 500: the vocabulary has", "give at most"]),
    (["--min-count", "100000"], ["--min-count 100000 leaves no concept", "give a lower --min-count"]),
])
def test_nlip_flags_that_would_do_nothing_are_refused(argv, words, embedded, fails_here, tmp_path):
    fails_here("nlip.py", "--data-root", embedded, "--out-dir", "o", "--epochs", "1", "--batch-size", "48",
               *argv, words=words)
    assert not (tmp_path / "o" / "last.pt").exists()
