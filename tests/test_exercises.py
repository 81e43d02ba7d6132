"""The course kit (exercises.py): the project's blocks pass the grader's checks, a blank copy is "not
implemented" everywhere, one planted bug fails its exercise alone, wrong answers of the usual kinds fail, a
hang or a crash fails one exercise, the student copy holds no answer and runs baseline.py, and --train."""
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import common
import exercises

NAMES = [ex.name for ex in exercises.EXERCISES]


def copy_project(dst):
    """The project's files (those of the student copy), unchanged, in dst."""
    dst.mkdir()
    for file in exercises.FILES:
        shutil.copy(ROOT / file, dst / file)
    return dst


def change(folder, file, old, new):
    text = (folder / file).read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {file}"
    (folder / file).write_text(text.replace(old, new))


def with_body(folder, file, name, body):
    """Replace the code of EXERCISE name in folder/file (below its header comment) by the lines of body."""
    lines = (folder / file).read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"# ---- EXERCISE {name}:"))
    indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
    code = next(i for i in range(first + 1, len(lines)) if not lines[i].lstrip().startswith("#"))
    end = next(i for i in range(code, len(lines)) if exercises.END.match(lines[i].rstrip("\n")))
    lines[code:end] = [indent + line + "\n" for line in body.splitlines()]
    (folder / file).write_text("".join(lines))


def verdicts(folder, names=None, time_limit=exercises.TIME_LIMIT):
    results = exercises.grade(folder, names, time_limit)
    return {ex.name: (verdict, detail) for ex, verdict, detail in results}


def test_the_projects_blocks_pass_every_exercise():
    got = verdicts(ROOT)
    assert got == {name: ("pass", "") for name in NAMES}


def test_make_writes_a_copy_whose_every_exercise_is_not_implemented_and_that_holds_no_answer(tmp_path):
    course = tmp_path / "course"
    p = subprocess.run([sys.executable, str(ROOT / "exercises.py"), "make", str(course)], capture_output=True,
                       text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in course.iterdir()) == sorted([*exercises.FILES, "EXERCISES.md"])
    assert verdicts(course) == {name: ("not implemented", "") for name in NAMES}
    # no block's code is anywhere in the copy: only its header comment and the stub
    copy = "\n".join((course / f).read_text() for f in exercises.FILES if f.endswith(".py"))
    for file in {file for ex in exercises.EXERCISES for file, _ in ex.where}:
        blocks = r"# ---- EXERCISE .*?\n(.*?)# ---- END EXERCISE"
        for body in re.findall(blocks, (ROOT / file).read_text(), re.DOTALL):
            lines = [line.split("  #")[0].strip() for line in body.splitlines()]
            code = [line for line in lines if line and not line.startswith("#")]
            assert code and not [line for line in code if line in copy]
    guide = (course / "EXERCISES.md").read_text()
    for i, ex in enumerate(exercises.EXERCISES, 1):  # in teaching order, each with its place and time
        assert f"## {i}. {ex.title} (`{ex.name}`, about {ex.minutes} min)" in guide
        for file, function in ex.where:
            line = int(re.search(rf"`{file}`, `{function}\(\)`, line (\d+)", guide).group(1))
            assert (course / file).read_text().splitlines()[line - 1].strip() == \
                f'raise NotImplementedError("exercise {ex.name}")'
    refused = subprocess.run([sys.executable, str(ROOT / "exercises.py"), "make", str(course)],
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "not an empty folder" in refused.stderr and (course / "EXERCISES.md").read_text() == guide


BUGS = [  # (exercise, file, right, wrong): one planted bug
    ("info_nce", "common.py", "F.cross_entropy(scale * img @ all_txt.T, labels",
     "F.cross_entropy(scale * all_txt @ img.T, labels"),  # the softmax over the wrong axis
    ("gmm_clean_prob", "common.py", "clean = gmm.means_.argmax() if higher_is_clean else gmm.means_.argmin()",
     "clean = 1 if higher_is_clean else 0"),  # the component by index, not by mean
    ("neighbours", "npc.py", "bank_txt = clean[nearest(txt, txt[c])]", "bank_txt = nearest(txt, txt[c])"),
    ("neighbours", "sdd.py", "nearest_image = nearest(img, img[owner[p]])",
     "nearest_image = nearest(img, img)"),
    ("npc_weight", "npc.py", "torch.where(r < 1, torch.tanh(r), torch.ones_like(r))  # (B,) w_i",
     "torch.where(r < 1, torch.sigmoid(r), torch.ones_like(r))  # (B,) w_i"),
    ("self_drop", "sdd.py", "higher_is_clean=True, max_iter=10", "higher_is_clean=False, max_iter=10"),
    ("dual_weight", "sdd.py", "r = (l_I / l_I_after + l_T / l_T_after) / 2",
     "r = (l_I_after / l_I + l_T_after / l_T) / 2"),  # the ratio inverted
    ("noise_probability", "nlip.py", "eps = 1 - common.gmm_clean_prob(loss)",
     "eps = common.gmm_clean_prob(loss)"),
    ("harmonized_loss", "nlip.py", "margin[rows, labels] = omega",
     "margin[rows, rows] = omega"),  # the margin on other logits than the positives', under DDP
    ("harmonized_loss", "nlip.py", "s_margin = scale if learned_margin else scale.detach()",
     "s_margin = scale"),  # the margin trains the temperature
    ("complete", "nlip.py", "mix = rng.random(len(eps)) < eps", "mix = rng.random(len(eps)) > eps"),
]


@pytest.mark.parametrize("name, file, right, wrong", BUGS, ids=[f"{b[0]}-{b[1]}" for b in BUGS])
def test_a_planted_bug_fails_its_exercise_and_no_other(tmp_path, name, file, right, wrong):
    folder = copy_project(tmp_path / "copy")
    change(folder, file, right, wrong)
    got = verdicts(folder)
    assert got[name][0] == "fail" and got[name][1]
    assert {other: v for other, v in got.items() if other != name} == \
        {other: ("pass", "") for other in NAMES if other != name}


WRONG = [  # (exercise, file, a whole block of the usual wrong kinds: a constant, an input, a missing step)
    ("info_nce", "common.py", "l = torch.zeros(len(img), requires_grad=True)"),
    ("info_nce", "common.py", "l = -scale * (img * txt).sum(1)"),  # the positive alone, no softmax
    ("gmm_clean_prob", "common.py", "p_clean = x[:, 0]"),
    ("neighbours", "npc.py", ("bank_txt = clean[nearest(txt, txt[torch.as_tensor(clean)])]\n"
                              "bank_img = bank_txt")),  # the text side's neighbours on both sides
    ("npc_weight", "npc.py", "w = torch.ones_like(l_I)"),
    ("npc_weight", "npc.py", "w = torch.tanh((l_I / l_I_after + l_T / l_T_after) / 2)"),  # not 1 above r = 1
    ("self_drop", "sdd.py", "keep = S > alpha\nw_con = S"),
    ("dual_weight", "sdd.py", "w_sig = torch.ones_like(w_con)\nw = w_con"),
    ("noise_probability", "nlip.py", "eps = torch.full((len(txt),), 0.4)"),
    ("harmonized_loss", "nlip.py", "loss = common.info_nce(img, txt, scale)"),  # the margin left out
    ("complete", "nlip.py", "synthetic = eps > threshold"),  # no mixing
    ("complete", "nlip.py", "synthetic = (eps > threshold) | (np.random.random(len(eps)) < eps)"),  # global
]


def test_wrong_answers_of_the_usual_kinds_fail(tmp_path):
    for k, (name, file, body) in enumerate(WRONG):
        folder = copy_project(tmp_path / f"copy{k}")
        with_body(folder, file, name, body)
        assert verdicts(folder, [name])[name][0] == "fail", (name, body)


def test_a_hang_a_crash_or_a_broken_file_fails_only_its_own_exercises(tmp_path):
    folder = copy_project(tmp_path / "copy")
    with_body(folder, "npc.py", "npc_weight", "while True:\n    pass")
    with_body(folder, "sdd.py", "dual_weight", "import os\nos._exit(3)")
    change(folder, "nlip.py", "def complete(eps, threshold, rng):", "def complete(eps, threshold, rng)")
    got = verdicts(folder, time_limit=5)
    assert got["npc_weight"] == ("fail", "no verdict within 5 s (an endless loop?)")
    assert got["dual_weight"] == ("fail", "the process died before its verdict (exit code 3)")
    for name in ("noise_probability", "harmonized_loss", "complete"):  # nlip.py no longer imports
        assert got[name][0] == "fail" and got[name][1].startswith("SyntaxError"), got[name]
    for name in ("info_nce", "gmm_clean_prob", "neighbours", "self_drop"):
        assert got[name] == ("pass", "")


def test_grade_refuses_a_folder_that_is_not_a_copy(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "exercises.py"), "grade", str(tmp_path)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 2 and p.stderr.startswith("exercises.py: error:") and "no common.py" in p.stderr


def test_the_student_copy_pretrains_and_runs_baseline_with_every_exercise_blank(embedded, tmp_path):
    course = tmp_path / "course"
    exercises.make(course)
    assert (course / "baseline.py").read_text() == (ROOT / "baseline.py").read_text()
    pretrain = ("import torch, embedded; embedded.ensure_embedded('data', {'pretrain': 64, 'test': 20}); "
                "embedded.pretrain_tiny('data', torch.device('cpu'), steps=3, batch_size=16, warmup=1)")
    p = subprocess.run([sys.executable, "-c", pretrain], cwd=course, capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "baseline.py", "--data-root", str(embedded), "--epochs", "1",
                        "--batch-size", "48", "--out-dir", str(tmp_path / "run")], cwd=course,
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert "test (best dev epoch" in p.stdout


def test_grade_train_runs_the_students_npc_for_one_epoch(embedded, tmp_path):
    folder = copy_project(tmp_path / "copy")
    p = subprocess.run([sys.executable, str(ROOT / "exercises.py"), "grade", str(folder), "--train",
                        "--data-root", str(embedded)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "score 9/9" in p.stdout and "memory bank: clean set" in p.stdout
    assert "--train: npc.py exited with code 0" in p.stdout
    assert (folder / "out" / "grade-npc" / "results.json").exists()
    blank = tmp_path / "blank"
    exercises.make(blank)
    p = subprocess.run([sys.executable, str(ROOT / "exercises.py"), "grade", str(blank), "--train"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 1
    assert "--train: skipped: npc.py needs info_nce, gmm_clean_prob, neighbours, npc_weight first" in p.stdout


def test_the_gmm_cases_put_the_clean_component_at_both_indices():
    """The check of gmm_clean_prob catches a component picked by index only if sklearn orders the
    components both ways among its cases."""
    orders = {int(np.argmin(common.gmm_fit(exercises.two_modes(*case))[0].means_.reshape(-1)))
              for case in exercises.GMM_CASES}
    assert orders == {0, 1}
