"""bench.py --quick: every method at noise 0.4 on small data, the table checked against each run's
own results."""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_script

COLUMNS = ["noise", "method", "seeds", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rSum",
           "% of clean-only", "detection AUC", "s / epoch", "x baseline", "peak GiB"]


def _table(path):
    lines = path.read_text().strip().splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == COLUMNS
    return {cells[1]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])}


def _cell(out, method, seed):
    """The results.json of the one finished run of a method and seed at noise 0.4."""
    found = [f for f in out.glob(f"{method}-n0.4-s{seed}-*/results.json")]
    assert len(found) == 1, found
    return found[0]


def test_bench_quick_table_matches_the_runs_and_finished_runs_are_reused(embedded, tmp_path):
    p = run_script("bench.py", "--quick", "--data-root", embedded, "--out-dir", tmp_path)
    assert p.returncode == 0, p.stderr
    rows = _table(tmp_path / "table.md")
    assert list(rows) == ["clean", "baseline", "npc", "sdd", "nlip"]
    res = {m: json.loads(_cell(tmp_path, m, 99).read_text()) for m in rows}
    for m, cells in rows.items():
        r, args = res[m]["test"], res[m]["args"]
        budget = (args["noise"], args["epochs"], args["batch_size"], args["seed"], args["noise_seed"])
        assert budget == (0.4, 1, 32, 99, 0)
        assert cells[2] == "1"  # one seed: rSum without its sd
        assert [float(c) for c in cells[3:10]] == pytest.approx(
            [r[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")], abs=0.051)
        assert float(cells[10]) == pytest.approx(100 * r["rsum"] / res["clean"]["test"]["rsum"], abs=0.051)
        assert (cells[11] == "-") == (m in ("clean", "baseline"))
        # the noisy pairs are found better than chance
        assert m in ("clean", "baseline") or 0.5 < float(cells[11]) <= 1
        assert float(cells[12]) > 0 and float(cells[14]) > 0
    assert float(rows["baseline"][13]) == 1.0
    assert res["clean"]["method"] == "baseline-clean"
    assert res["nlip"]["args"]["pretrained"].endswith("nc-tiny-pretrained.pt")
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert len(summary["runs"]) == 5 and summary["budget"]["epochs"] == 1

    again = run_script("bench.py", "--quick", "--data-root", embedded, "--out-dir", tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("reused") == 5 and _table(tmp_path / "table.md") == rows
    # a changed command goes to a new folder: the finished cell is kept whatever the new one does
    before = _cell(tmp_path, "baseline", 99).read_bytes()
    bad = run_script("bench.py", "--quick", "--methods", "baseline", "--epochs", "0", "--data-root", embedded,
                     "--out-dir", tmp_path)
    assert "FAILED (exit 2): error: --epochs must be 1 or more, got 0" in bad.stdout
    assert _cell(tmp_path, "baseline", 99).read_bytes() == before

    # a checkout whose npc.py and captions.py (not imported by baseline.py) differ, and whose common.py has a
    # new comment and docstring, keeps the baseline's cell; a second seed gives mean and sd
    code = tmp_path / "changed-code"
    code.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, code / f.name)
    for name in ("npc.py", "captions.py"):
        with open(code / name, "a") as f:
            f.write("CHANGED = 1\n")
    text = (code / "common.py").read_text()
    (code / "common.py").write_text(text.replace('"""', '"""Another docstring. ', 1) + "# a comment\n")
    argv = [sys.executable, str(code / "bench.py"), "--quick", "--methods", "baseline", "--data-root",
            str(embedded), "--out-dir", str(tmp_path)]
    two = subprocess.run([*argv, "--seeds", "99", "0"], capture_output=True, text=True, timeout=600,
                         check=False)
    assert two.returncode == 0, two.stderr
    assert "baseline noise 0.4 seed 99: reused" in two.stdout and "seed 0: done in" in two.stdout
    rsums = [json.loads(_cell(tmp_path, "baseline", s).read_text())["test"]["rsum"] for s in (99, 0)]
    row = _table(tmp_path / "table.md")["baseline"]
    mean, sd = (float(x) for x in row[9].split(" ± "))
    assert row[2] == "2" and mean == pytest.approx(sum(rsums) / 2, abs=0.051)
    assert sd == pytest.approx(abs(rsums[0] - rsums[1]) / 2 ** 0.5, abs=0.051)
    # a change to code changes the hash of exactly the methods that import it (a cell is reused only while its
    # hash is the one in its bench.json, as the reuse above shows): npc.py and captions.py changed above
    methods = ("baseline", "npc", "nlip")

    def hashes(folder):
        show = f"import bench; print(*(bench.source_hash(m) for m in {methods!r}))"
        p = subprocess.run([sys.executable, "-c", show], cwd=folder, capture_output=True, text=True,
                           check=True)
        return dict(zip(methods, p.stdout.split(), strict=True))

    here, there = hashes(ROOT), hashes(code)
    assert there["baseline"] == here["baseline"]
    assert there["npc"] != here["npc"] and there["nlip"] != here["nlip"]
    with open(code / "common.py", "a") as f:
        f.write("CHANGED = 1\n")
    changed = hashes(code)
    assert all(changed[m] != there[m] for m in changed)


def test_bench_bad_noise_is_one_line(tmp_path):
    p = run_script("bench.py", "--noise", "0.4", "1.0", "--out-dir", tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == "error: --noise must be in [0, 1), got [0.4, 1.0]"


@pytest.mark.parametrize("flags, want", [
    (["--seeds", "99", "0", "99"], "--seeds lists 99 more than once"),
    (["--noise", "0.4", "0.4"], "--noise lists 0.4 more than once"),
    (["--fake-f30k", "10"], "--fake-f30k is for --input only"),
    (["--workers", "4"], "--workers is for --input only")])
def test_bench_refuses_repeats_and_flags_that_would_do_nothing(tmp_path, flags, want):
    p = run_script("bench.py", *flags, "--out-dir", tmp_path)
    assert p.returncode == 2 and p.stderr.startswith(f"error: {want}") and len(p.stderr.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_generated_data_never_replaces_a_dataset(tmp_path):
    """--fake-f30k writes only into a new or empty folder or one it marked; a real dataset's index stays."""
    real = tmp_path / "f30k"
    real.mkdir()
    (real / "dataset_flickr30k.json").write_text('{"images": []}')
    p = run_script("bench.py", "--input", "--fake-f30k", "4", "--dataset", "f30k", "--data-root", real,
                   "--out-dir", tmp_path / "out")
    assert p.returncode == 2 and "holds files that generated data did not write" in p.stderr
    assert (real / "dataset_flickr30k.json").read_text() == '{"images": []}'
    assert sorted(f.name for f in real.iterdir()) == ["dataset_flickr30k.json"]
