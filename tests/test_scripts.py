"""The scripts end to end: a short fine-tune that improves on its start, resume, eval.py, and bad input."""
import json

import pytest
from conftest import run_script

import baseline
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


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(finished, embedded, tmp_path, monkeypatch):
    _, want = finished
    argv = ["baseline.py", "--data-root", str(embedded), "--noise", "0", "--out-dir", str(tmp_path), *FAST]
    save = common.save_epoch

    def crash_after_first_epoch(args, method, model, opt, epoch, *rest, **kw):
        best = save(args, method, model, opt, epoch, *rest, **kw)
        if epoch == 0:
            raise KeyboardInterrupt
        return best

    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(common, "save_epoch", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        baseline.main()
    assert not (tmp_path / "results.json").exists()
    monkeypatch.setattr(common, "save_epoch", save)
    monkeypatch.setattr("sys.argv", argv + ["--resume"])
    baseline.main()
    got = json.loads((tmp_path / "results.json").read_text())
    assert "resumed from" in (tmp_path / "log.txt").read_text()
    assert [h["dev"]["rsum"] for h in got["history"]] == pytest.approx([h["dev"]["rsum"] for h in want["history"]])
    assert got["test"]["rsum"] == pytest.approx(want["test"]["rsum"])


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


@pytest.mark.parametrize("argv,words", [
    (["--dataset", "f30k", "--data-root", "/no/such/folder"], ["/no/such/folder", "does not exist"]),
    (["--dataset", "f30k"], ["--data-root is required"]),
    (["--noise", "1.2"], ["--noise must be in [0, 1)"]),
    (["--noise", "-0.1"], ["--noise must be in [0, 1)"]),
    (["--pretrained", "/no/such/weights.pt"], ["neither a file nor a tag"]),
])
def test_bad_input_gives_one_line_error(argv, words, embedded, tmp_path):
    root = [] if "--data-root" in argv or "--dataset" in argv else ["--data-root", embedded]
    _fails_in_one_line(run_script("baseline.py", "--out-dir", tmp_path / "o", *root, *argv), *words)


@pytest.mark.parametrize("script", ["baseline.py", "npc.py", "sdd.py", "nlip.py", "eval.py", "bench.py"])
def test_unknown_dataset_or_bad_flag_value_is_one_line(script):
    _fails_in_one_line(run_script(script, "--dataset", "imagenet"), "--dataset", "invalid choice: 'imagenet'")
    _fails_in_one_line(run_script(script, "--device", "cpu", "--split" if script == "eval.py" else "--noise", "x"),
                       "invalid")


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


def test_resume_from_another_method_or_nothing_is_refused(finished, embedded, tmp_path):
    out, _ = finished
    _fails_in_one_line(run_script("baseline.py", "--resume", "--out-dir", tmp_path), "last.pt not found")
    _fails_in_one_line(run_script("baseline.py", "--data-root", embedded, "--resume", "--clean-only", "--out-dir", out),
                       "last.pt is not a baseline-clean checkpoint of nc-tiny")


@pytest.mark.parametrize("script,argv,words", [
    ("npc.py", [], ["last.pt is not a npc checkpoint of nc-tiny"]),
    ("sdd.py", [], ["last.pt is not a sdd checkpoint of nc-tiny"]),
    ("nlip.py", [], ["last.pt is not a nlip checkpoint of nc-tiny"]),
    ("baseline.py", ["--model", "ViT-B-32"], ["last.pt is not a baseline checkpoint of ViT-B-32"]),
])
def test_resume_from_another_model_or_method_is_refused_before_any_work(script, argv, words, finished, embedded):
    out, _ = finished
    p = run_script(script, "--data-root", embedded, "--resume", "--out-dir", out, *argv)
    _fails_in_one_line(p, *words)
    assert "memory bank" not in p.stdout and "start: dev" not in p.stdout


def test_weights_or_checkpoint_of_another_model_or_no_weights_at_all_is_one_line(finished, embedded, tmp_path):
    out, _ = finished
    _fails_in_one_line(run_script("eval.py", "--checkpoint", out / "best.pt", "--model", "ViT-B-32"), "does not fit ViT-B-32")
    (tmp_path / "notes.pt").write_text("not weights")
    for script, out in (("baseline.py", ["--out-dir", tmp_path / "o"]), ("eval.py", [])):
        _fails_in_one_line(run_script(script, "--data-root", embedded, "--pretrained", tmp_path / "notes.pt", *out),
                           "cannot create nc-tiny from", "notes.pt")
    _fails_in_one_line(run_script("eval.py", "--checkpoint", tmp_path / "notes.pt"), "cannot read checkpoint", "notes.pt")
    assert not (tmp_path / "o" / "results.json").exists()
