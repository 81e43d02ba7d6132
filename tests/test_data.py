"""Noise injection and the dataset loaders, on small folders the tests write themselves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import embedded
from data import UserError

ROOT = Path(__file__).resolve().parent.parent


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(names):
        Image.new("RGB", (20, 16), (k * 40 % 255, 0, 0)).save(folder / n)


def _split(n_img, caps=5):
    owner = np.repeat(np.arange(n_img), caps)
    return data.Split([f"{i}.png" for i in range(n_img)], [f"caption {k}" for k in range(len(owner))], owner)


# ---- noise
@pytest.mark.parametrize("noise", [0.0, 0.2, 0.4, 0.8])
def test_noise_rate_mask_and_permutation(tmp_path, noise):
    split = _split(200)
    noisy, is_noisy = data.inject_noise(split, noise, seed=0, cache_file=tmp_path / "n.npy")
    src = np.load(tmp_path / "n.npy")
    assert sorted(src) == list(range(1000))  # a permutation: every caption is kept exactly once
    assert (src != np.arange(1000)).sum() <= round(noise * 1000)  # only the chosen slots move
    assert noisy.captions == [split.captions[j] for j in src]
    assert np.array_equal(is_noisy, split.img_of_cap[src] != split.img_of_cap)  # the mask is the truth
    assert abs(is_noisy.mean() - noise) < 0.03  # few shuffled captions land back on their own image


def test_noise_is_deterministic_and_cached_whole(tmp_path):
    split = _split(100)
    _, a = data.inject_noise(split, 0.4, 0, tmp_path / "a.npy")
    _, b = data.inject_noise(split, 0.4, 0, tmp_path / "b.npy")
    _, c = data.inject_noise(split, 0.4, 1, tmp_path / "c.npy")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert not list(tmp_path.glob("*.tmp"))
    want = np.load(tmp_path / "a.npy")
    for stale in (np.arange(7), np.load(tmp_path / "c.npy")):  # the wrong length; another seed's permutation
        np.save(tmp_path / "a.npy", stale)
        _, d = data.inject_noise(split, 0.4, 0, tmp_path / "a.npy")
        # not trusted: rewritten
        assert np.array_equal(a, d) and np.array_equal(np.load(tmp_path / "a.npy"), want)
    (tmp_path / "a.npy").write_bytes(b"not an npy file")
    assert np.array_equal(data.inject_noise(split, 0.4, 0, tmp_path / "a.npy")[1], a)


def test_atomic_write_leaves_another_writers_temporary_file_alone(tmp_path):
    # what a second process writing r.json at once would use
    other = tmp_path / f"r.json.{os.getpid() + 1}.tmp"
    other.write_text("half of another process's file")
    data.atomic_write(tmp_path / "r.json", lambda f: f.write(b"{}"))
    assert (tmp_path / "r.json").read_text() == "{}" and other.read_text() == "half of another process's file"


@pytest.mark.parametrize("noise", [-0.1, 1.0, 1.5])
def test_noise_outside_unit_interval_is_refused(tmp_path, noise):
    with pytest.raises(UserError, match="--noise"):
        data.inject_noise(_split(10), noise, 0, tmp_path / "n.npy")
    assert not (tmp_path / "n.npy").exists()


# ---- loaders
def test_karpathy_flickr_layout(tmp_path):
    images = [{"filename": f"{i}.jpg", "split": s,
               "sentences": [{"raw": f"img {i} cap {k} "} for k in range(5 + (i == 0))]}
              for i, s in enumerate(["train", "train", "val", "test", "test"])]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    _images(tmp_path / "flickr30k-images", [f"{i}.jpg" for i in range(5)])
    train = data.load_split("f30k", tmp_path, "train")
    assert len(train.paths) == 2 and len(train.captions) == 10  # 6 captions of image 0 cut to 5
    assert train.captions[5] == "img 1 cap 0" and list(train.img_of_cap) == [0] * 5 + [1] * 5
    assert train.paths[1].endswith("flickr30k-images/1.jpg")
    test = data.load_split("f30k", tmp_path, "test")
    assert len(test.paths) == 2 and test.captions[0] == "img 3 cap 0"
    assert len(data.load_split("f30k", tmp_path, "dev").paths) == 1


def test_karpathy_coco_layout_with_filepath_and_restval(tmp_path):
    folders = [("train2014", "train"), ("val2014", "restval"), ("val2014", "test")]
    images = [{"filepath": fp, "filename": f"{k}.jpg", "split": s,
               "sentences": [{"raw": f"c{k}{j}"} for j in range(5)]}
              for k, (fp, s) in enumerate(folders)]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    _images(tmp_path / "images" / "train2014", ["0.jpg"])
    _images(tmp_path / "images" / "val2014", ["1.jpg", "2.jpg"])
    train = data.load_split("coco", tmp_path, "train")
    assert [p.split("images/")[1] for p in train.paths] == ["train2014/0.jpg", "val2014/1.jpg"]


def _scan(root, dataset, ids_per_caption):
    d = root / "annotations" / "scan_split"
    d.mkdir(parents=True)
    caps_per = 1 if dataset == "cc120k" else 5
    ids = {"train": ["7", "3", "9"], "dev": ["4"], "test": ["5", "8"]}
    for split, img_ids in ids.items():
        caps = "".join(f"{i} says {k}\n" for i in img_ids for k in range(caps_per))
        (d / f"{split}_caps.txt").write_text(caps)
        lines = [i for i in img_ids for _ in range(caps_per if ids_per_caption else 1)]
        (d / f"{split}_ids.txt").write_text("\n".join(lines) + "\n")
    names = {"f30k": [f"f{i}.jpg" for i in range(10)], "coco": [f"COCO_2014_{i:012d}.jpg" for i in range(10)],
             "cc120k": [f"{i}.jpg" for i in range(10)]}[dataset]
    if dataset == "f30k":
        (d / "image_name.txt").write_text("\n".join(names) + "\n")
    _images(root / "images", names)


@pytest.mark.parametrize("dataset,ids_per_caption",
                         [("f30k", False), ("f30k", True), ("coco", True), ("cc120k", True)])
def test_scan_layout(tmp_path, dataset, ids_per_caption):
    _scan(tmp_path, dataset, ids_per_caption)
    train = data.load_split(dataset, tmp_path, "train")
    caps_per = 1 if dataset == "cc120k" else 5
    assert len(train.paths) == 3 and len(train.captions) == 3 * caps_per
    assert train.captions[caps_per] == "3 says 0"  # images keep the order of the ids file
    name = {"f30k": "f3.jpg", "coco": "COCO_2014_000000000003.jpg", "cc120k": "3.jpg"}[dataset]
    assert train.paths[1].endswith(f"images/{name}")
    assert list(train.img_of_cap) == list(np.repeat([0, 1, 2], caps_per))
    (tmp_path / "annotations" / "scan_split" / "dev_ids.txt").unlink()
    with pytest.raises(UserError, match="dev_ids.txt is missing"):
        data.load_split(dataset, tmp_path, "dev")


def test_scan_text_files_that_pair_captions_with_the_wrong_images_are_refused(tmp_path):
    _scan(tmp_path, "f30k", ids_per_caption=False)  # train: 3 ids, one a line, 15 captions
    d = tmp_path / "annotations" / "scan_split"
    caps = (d / "train_caps.txt").read_text()
    (d / "train_caps.txt").write_text(caps + "\n\n")  # trailing blank lines are stripped, then counted
    assert len(data.load_split("f30k", tmp_path, "train").captions) == 15
    for bad, words in ((caps + caps, "30 captions for 3 ids"),  # doubled: 10 captions an image
                       (caps + "one more\n", "16 captions for 3 ids"),
                       (caps.replace("3 says 0\n", "\n"), "line 6 is blank")):
        (d / "train_caps.txt").write_text(bad)
        with pytest.raises(UserError, match=words):
            data.load_split("f30k", tmp_path, "train")
    (d / "train_caps.txt").write_text(caps)
    (d / "train_ids.txt").write_text("7\n3\n")  # truncated
    with pytest.raises(UserError, match="15 captions for 2 ids"):
        data.load_split("f30k", tmp_path, "train")
    (d / "train_ids.txt").write_text("7\n7\n7\n")  # as many lines as images, but not one per image
    with pytest.raises(UserError, match="distinct ids"):
        data.load_split("f30k", tmp_path, "train")
    for bad in ("7\nx3\n9\n", "7\n3\n10\n"):  # not a number; beyond the 10 lines of image_name.txt
        (d / "train_ids.txt").write_text(bad)
        with pytest.raises(UserError, match="train_ids.txt: the id '(x3|10)' names no f30k image"):
            data.load_split("f30k", tmp_path, "train")
    per_caption = "".join(f"{i}\n" for i in ["7"] * 7 + ["3"] * 8)  # one id a caption: 7 and 8 captions
    (d / "train_ids.txt").write_text(per_caption)
    owner = data.load_split("f30k", tmp_path, "train").img_of_cap
    assert [sum(owner == k) for k in (0, 1)] == [5, 5]  # capped at 5


def test_custom_karpathy_json(tmp_path):
    images = [{"filename": "a.png", "split": "test", "sentences": [{"raw": "x"}, {"raw": "y"}]}]
    (tmp_path / "dataset_mine.json").write_text(json.dumps({"images": images}))
    _images(tmp_path / "images", ["a.png"])
    split = data.load_split("custom", tmp_path, "test")
    assert split.captions == ["x", "y"] and list(split.img_of_cap) == [0, 0]
    (tmp_path / "dataset_other.json").write_text(json.dumps({"images": images}))
    with pytest.raises(UserError, match="holds 2 Karpathy JSON files .dataset_mine.json, dataset_other.json"):
        data.load_split("custom", tmp_path, "test")


def test_custom_on_a_scan_folder_names_the_layout(tmp_path):
    _scan(tmp_path, "f30k", ids_per_caption=False)
    with pytest.raises(UserError, match="SCAN layout, which --dataset custom does not read"):
        data.load_split("custom", tmp_path, "train")


def test_embedded_is_generated_in_karpathy_layout(tmp_path, capsys):
    embedded.ensure_embedded(tmp_path, {"pretrain": 6, "train": 5, "dev": 3, "test": 4})
    printed = capsys.readouterr().out
    assert f"{tmp_path} holds no dataset_embedded.json: generating the embedded dataset there" in printed
    meta = json.loads((tmp_path / "dataset_embedded.json").read_text())
    assert [im["split"] for im in meta["images"]].count("val") == 3
    for split, n in (("pretrain", 6), ("train", 5), ("dev", 3), ("test", 4)):
        s = data.load_split("embedded", tmp_path, split)
        assert len(s.paths) == n and len(s.captions) == 5 * n
        assert all(len(set(s.captions[5 * i:5 * i + 5])) >= 3 for i in range(n))  # paraphrases, not copies
    pre = [o for im in meta["images"] if im["split"] == "pretrain" for o in im["objects"]]
    assert not {(o["colour"], o["shape"]) for o in pre} & embedded.HELD_OUT
    again = tmp_path / "again"
    embedded.ensure_embedded(again, {"pretrain": 6, "train": 5, "dev": 3, "test": 4})
    assert (again / "dataset_embedded.json").read_text() == (tmp_path / "dataset_embedded.json").read_text()
    image = (tmp_path / "images" / "train_00002.png").read_bytes()
    assert (again / "images" / "train_00002.png").read_bytes() == image


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_split("f30k", tmp_path / "nope", "train")
    with pytest.raises(UserError, match="unknown dataset"):
        data.load_split("imagenet", tmp_path, "train")
    with pytest.raises(UserError, match="neither"):
        data.load_split("f30k", tmp_path, "train")
    (tmp_path / "dataset_flickr30k.json").write_text("{not json")
    with pytest.raises(UserError, match="Karpathy"):
        data.load_split("f30k", tmp_path, "train")
    images = [{"filename": f"{i}.jpg", "split": "train", "sentences": [{"raw": "c"}]} for i in range(3)]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    _images(tmp_path / "images", ["0.jpg", "1.jpg"])
    with pytest.raises(UserError, match="1 image.*missing.*2.jpg"):
        data.load_split("f30k", tmp_path, "train")
    (tmp_path / "images" / "2.jpg").write_bytes(b"not a jpeg")
    # found when the split loads, before training
    with pytest.raises(UserError, match="cannot read image .*2.jpg"):
        data.load_split("f30k", tmp_path, "train")
    images = data.Decoded([str(tmp_path / "images" / f"{i}.jpg") for i in range(3)], lambda im: im)
    with pytest.raises(UserError, match="cannot read image .*2.jpg"):  # and when it is decoded
        images[2]
    assert images[0][0].shape == (3, 16, 20)


@pytest.mark.parametrize("raw,words", [
    (3, "not text"), (None, "not text"), ("   ", "empty"), ([], "no caption"),
])
def test_captions_that_are_not_text_or_missing_are_one_line(tmp_path, raw, words):
    images = [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"caption {i}"}]}
              for i in range(3)]
    images[1]["sentences"] = [] if raw == [] else [{"raw": "fine"}, {"raw": raw}]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    _images(tmp_path / "images", [f"{i}.jpg" for i in range(3)])
    want = "test split: image .*1.jpg has no caption, or a caption that is empty or not text"
    with pytest.raises(UserError, match=want):
        data.load_split("f30k", tmp_path, "test")


def test_the_karpathy_json_is_read_as_utf8_whatever_the_locale(tmp_path):
    images = [{"filename": "0.jpg", "split": "train",
               "sentences": [{"raw": "un café près de la rivière"}]}]
    index = json.dumps({"images": images}, ensure_ascii=False)
    (tmp_path / "dataset_flickr30k.json").write_text(index, encoding="utf-8")
    _images(tmp_path / "images", ["0.jpg"])
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")  # an ASCII locale
    code = ("import data, locale; print(locale.getpreferredencoding(False), "
            f"ascii(data.load_split('f30k', {str(tmp_path)!r}, 'train').captions))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       encoding="utf-8", check=False)
    assert p.returncode == 0, p.stderr
    assert "ANSI" in p.stdout or "ascii" in p.stdout.lower()  # the locale really is not UTF-8
    assert ascii(["un café près de la rivière"]) in p.stdout


def test_the_pretrained_weights_do_not_depend_on_the_threads(tmp_path):
    """Products sum in another order on another number of threads: before pre-training ran on a fixed number,
    OMP_NUM_THREADS 1 and 2 built different weights (a full build: sha256 aa8025c8 against a4d3e4b0)."""
    sizes = {"pretrain": 200, "train": 10, "dev": 10, "test": 100}
    embedded.ensure_embedded(tmp_path / "data", sizes)
    build = ("import sys, torch, embedded; "
             "embedded.pretrain_tiny(sys.argv[1], torch.device('cpu'), steps=12, batch_size=64, warmup=3)")
    shas = []
    for threads in ("1", "2"):
        root = tmp_path / f"threads{threads}"
        root.mkdir()
        for f in (tmp_path / "data").iterdir():
            (root / f.name).symlink_to(f)
        subprocess.run([sys.executable, "-c", build, str(root)], check=True, capture_output=True,
                       env=dict(os.environ, OMP_NUM_THREADS=threads), cwd=Path(embedded.__file__).parent)
        shas.append(embedded.sha256(root / "nc-tiny-pretrained.pt"))
    assert shas[0] == shas[1]


def test_a_scan_caption_file_that_is_not_utf8_is_one_line(tmp_path):
    """Before: a UnicodeDecodeError traceback."""
    _scan(tmp_path, "coco", ids_per_caption=True)
    d = tmp_path / "annotations" / "scan_split"
    caps = (d / "train_caps.txt").read_text().replace("7 says", "caf\xe9 7")
    (d / "train_caps.txt").write_bytes(caps.encode("latin-1"))
    with pytest.raises(UserError, match="train_caps.txt is not UTF-8 text, the encoding expected"):
        data.load_split("coco", tmp_path, "train")
