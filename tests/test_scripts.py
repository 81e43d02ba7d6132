"""The scripts end to end: a short fine-tune that improves on its start, resume, eval.py, and bad input."""
import importlib
import json

import pytest
from conftest import run_script

import common

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
    p = run_script("baseline.py", "--data-root", embedded, "--noise", "0.4", "--clean-only", "--out-dir", tmp_path,
                   "--epochs", "1", "--batch-size", "48", "--warmup", "5")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "baseline-clean" and 0.35 < res["noise_rate"] < 0.41


def _fails_in_one_line(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def fails_here(capsys, monkeypatch, tmp_path):
    """fails_here(script, *argv, words=[...]): the script's main, in this process (its code path is the command's:
    common.run), ends with exit status 2 and one error line holding the words, and writes no results. -> stdout"""
    monkeypatch.chdir(tmp_path)  # the default data/embedded and out/ are never the repository's

    def check(script, *argv, words=()):
        monkeypatch.setattr("sys.argv", [script, *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            common.run(importlib.import_module(script[:-3]).main)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        for w in words:
            assert w in lines[0], lines[0]
        assert not list(tmp_path.rglob("results.json"))
        return out
    return check


def test_bad_input_from_the_command_line_is_one_line_and_exit_2(embedded, tmp_path):
    _fails_in_one_line(run_script("baseline.py", "--data-root", embedded, "--noise", "1.2", "--out-dir", tmp_path),
                       "--noise must be in [0, 1)")
    _fails_in_one_line(run_script("npc.py", "--dataset", "imagenet"), "--dataset", "invalid choice: 'imagenet'")


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
    fails_here(script, "--device", "cpu", "--split" if script == "eval.py" else "--noise", "x", words=["invalid"])


@pytest.mark.parametrize("script", ["baseline.py", "npc.py"])
def test_a_diverged_run_stops_in_one_line_before_writing_a_checkpoint(script, embedded, fails_here, tmp_path):
    fails_here(script, "--data-root", embedded, "--out-dir", "o", "--lr", "inf", "--epochs", "1", "--batch-size", "48",
               words=["the loss is nan at optimiser step", "lr inf", "diverged"])
    assert not (tmp_path / "o" / "best.pt").exists() and not (tmp_path / "o" / "last.pt").exists()


def test_missing_and_corrupt_images_give_one_line_error(embedded, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(embedded, root)
    (root / "images" / "train_00003.png").write_bytes(b"\x89PNG broken")
    _fails_in_one_line(run_script("baseline.py", "--data-root", root, "--out-dir", tmp_path / "o", *FAST),
                       "cannot read image", "train_00003.png")
    (root / "images" / "dev_00001.png").unlink()
    _fails_in_one_line(run_script("baseline.py", "--data-root", root, "--out-dir", tmp_path / "o", *FAST),
                       "missing", "dev_00001.png")


@pytest.mark.parametrize("script,argv,words", [
    ("baseline.py", ["--clean-only"], ["last.pt is not a baseline-clean checkpoint of nc-tiny"]),
    ("npc.py", [], ["last.pt is not a npc checkpoint of nc-tiny"]),
    ("sdd.py", [], ["last.pt is not a sdd checkpoint of nc-tiny"]),
    ("nlip.py", [], ["last.pt is not a nlip checkpoint of nc-tiny"]),
    ("baseline.py", ["--model", "ViT-B-32"], ["last.pt is not a baseline checkpoint of ViT-B-32"]),
])
def test_resume_from_another_model_or_method_is_refused_before_any_work(script, argv, words, finished, embedded, fails_here):
    out, _ = finished
    assert fails_here(script, "--data-root", embedded, "--resume", "--out-dir", out, *argv, words=words) == ""  # nothing ran


def test_resume_with_no_checkpoint_and_bad_weights_or_checkpoints_are_one_line(finished, embedded, fails_here, tmp_path):
    out, _ = finished
    fails_here("baseline.py", "--data-root", embedded, "--resume", "--out-dir", "o", words=["last.pt not found"])
    fails_here("eval.py", "--checkpoint", out / "best.pt", "--model", "ViT-B-32", words=["does not fit ViT-B-32"])
    (tmp_path / "notes.pt").write_text("not weights")
    for script, rest in (("baseline.py", ["--out-dir", "o"]), ("eval.py", [])):
        fails_here(script, "--data-root", embedded, "--pretrained", tmp_path / "notes.pt", *rest,
                   words=["cannot create nc-tiny from", "notes.pt"])
    fails_here("eval.py", "--checkpoint", tmp_path / "notes.pt", words=["cannot read checkpoint", "notes.pt"])
