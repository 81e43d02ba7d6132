"""Datasets and noise injection: the embedded generated dataset, Flickr30K, MS-COCO, CC120K, custom.

A split is three parallel facts (class Split): `paths`, one image file per image; `captions`, a list of
strings; `img_of_cap` (N,), the image each caption belongs to. Training samples are caption slots: item k
of the training set is caption k with image img_of_cap[k], and it carries k so methods can keep state.

On-disk layouts (--data-root is the folder holding them):
  Karpathy JSON  dataset_*.json with images[].filename, .split, .sentences[].raw (+ .filepath for COCO);
                 image files under images/, flickr30k-images/ or the root itself.
  SCAN/NPC text  annotations/scan_split/{train,dev,test}_caps.txt (one caption a line) and
                 {split}_ids.txt (one id per caption, or one per image, repeated for its captions).
                 Images under images/: f30k names from annotations/scan_split/image_name.txt (line = id),
                 coco COCO_2014_<id, 12 digits>.jpg, cc120k <id>.jpg.
"""
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw


class UserError(Exception):
    """A bad input the user can fix; the scripts print it as one line and exit with status 2."""


class Split(NamedTuple):
    paths: list
    captions: list
    img_of_cap: np.ndarray


DATASETS = ("embedded", "f30k", "coco", "cc120k", "custom")
JSON_NAMES = {"embedded": "dataset_embedded.json", "f30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
KARPATHY_SPLITS = {"train": ("train", "restval"), "dev": ("val", "dev"), "test": ("test",), "pretrain": ("pretrain",)}
MAX_CAPS = 5  # captions kept per image (COCO has a few images with 6 or 7; the protocol uses 5)

# ---------------------------------------------------------------------------------------------------------
# The embedded dataset: shapes with attributes on 64 px images, 5 paraphrased captions each.
# Pre-training split: half plain backgrounds, mostly terse alt-text captions, 12 colour-shape pairs held out.
# train/dev/test: textured backgrounds, full captions with synonyms. The shift is what fine-tuning learns.
SHAPES = {"circle": ("circle", "disc", "round shape"), "square": ("square", "box", "block"),
          "triangle": ("triangle", "wedge", "three-sided shape"), "diamond": ("diamond", "rhombus", "lozenge"),
          "hexagon": ("hexagon", "six-sided shape", "honeycomb cell"), "star": ("star", "five-pointed star", "starburst")}
COLOURS = {"red": ((215, 35, 35), ("red", "crimson", "scarlet")), "green": ((35, 175, 60), ("green", "emerald", "leafy")),
           "blue": ((40, 80, 225), ("blue", "azure", "cobalt")), "yellow": ((240, 225, 40), ("yellow", "golden", "lemon")),
           "purple": ((140, 50, 185), ("purple", "violet", "plum")), "orange": ((250, 140, 20), ("orange", "amber", "tangerine")),
           "pink": ((250, 125, 190), ("pink", "rose", "salmon")), "cyan": ((50, 215, 225), ("cyan", "turquoise", "aqua"))}
SIZES = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITIONS = (("top left", "upper left"), ("top", "top middle"), ("top right", "upper right"), ("left", "middle left"),
             ("center", "middle"), ("right", "middle right"), ("bottom left", "lower left"), ("bottom", "bottom middle"),
             ("bottom right", "lower right"))
TEMPLATES = ("{}", "a picture of {}", "an image showing {}", "there is {}", "{} on a patterned background", "a photo with {}")
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
HELD_OUT = {PAIRS[i] for i in np.random.default_rng(0).choice(len(PAIRS), 12, replace=False)}  # never in pre-training
EMBEDDED_SIZES = {"pretrain": 10000, "train": 4000, "dev": 1000, "test": 1000}
SPLIT_IDS = {"pretrain": 0, "train": 1, "dev": 2, "test": 3}


def _article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(objs, rng, terse):
    """One caption of objs [(shape, colour, size, pos)]: terse alt-text, or a full paraphrase."""
    if terse:
        return ", ".join(f"{c} {s}" for s, c, _, _ in objs)
    keep = list(rng.permutation(len(objs)))
    if len(objs) > 1 and rng.random() < 0.3:
        keep = keep[1:]  # drop one object: captions of web data are partial
    phrases = []
    for s, c, z, p in (objs[i] for i in keep):
        words = [rng.choice(SIZES[z])] if rng.random() < 0.5 else []
        words += [rng.choice(COLOURS[c][1]), rng.choice(SHAPES[s])]
        if rng.random() < 0.5:
            words.append(f"{rng.choice(['in the', 'at the'])} {rng.choice(POSITIONS[p])}")
        phrases.append(_article(" ".join(words)))
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return rng.choice(TEMPLATES).format(listed)


def _render(objs, rng, textured, size=128, out=64):
    """Draw objs at `size` px on a plain or textured background, downsampled to `out` px (PIL image)."""
    base = rng.integers(60, 125) + rng.integers(-20, 21, 3)  # a muted, nearly grey background
    if textured:
        yy, xx = np.mgrid[:size, :size]
        stripes = ((xx * rng.integers(-1, 2) + yy * rng.integers(1, 3)) // rng.integers(4, 10)) % 2
        arr = base + stripes[..., None] * rng.integers(-35, 36, 3) + rng.normal(0, 10, (size, size, 3))
    else:
        arr = np.broadcast_to(base, (size, size, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s, c, z, p in objs:
        cx, cy = (np.array([p % 3, p // 3]) + 0.5) * size / 3 + rng.integers(-4, 5, 2)
        r = (10 if z == "small" else 18) + rng.integers(-1, 2)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[c][0]) + rng.integers(-25, 26, 3), 0, 255))
        if s == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s == "star":
            ang = np.pi * np.arange(10) / 5 - np.pi / 2
            rad = np.where(np.arange(10) % 2 == 0, r * 1.2, r * 0.5)
            draw.polygon(list(zip(cx + rad * np.cos(ang), cy + rad * np.sin(ang))), fill=fill)
        else:
            sides, rot = {"triangle": (3, 0), "diamond": (4, 45), "hexagon": (6, 0)}[s]
            draw.regular_polygon((cx, cy, r * 1.15), sides, rotation=rot, fill=fill)
    return img.resize((out, out), Image.LANCZOS)


def _make_image(split, i, seed):
    """Objects, image and 5 distinct captions of image i of a split; deterministic in (seed, split, i)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
    pairs = [q for q in PAIRS if split != "pretrain" or q not in HELD_OUT]
    objs = [(pairs[k][1], pairs[k][0], rng.choice(list(SIZES)), int(p))
            for k, p in zip(rng.choice(len(pairs), 3), rng.choice(9, 3, replace=False))][:rng.integers(2, 4)]
    pretrain = split == "pretrain"
    img = _render(objs, rng, textured=not pretrain or rng.random() < 0.5)
    caps = []
    for _ in range(50):  # paraphrases until 5 distinct ones (a 2-object image has fewer variants)
        cap = _caption(objs, rng, terse=pretrain and rng.random() < 0.7)
        if cap not in caps:
            caps.append(cap)
        if len(caps) == MAX_CAPS:
            break
    caps += [caps[-1]] * (MAX_CAPS - len(caps))
    return objs, img, caps


def ensure_embedded(root, sizes=None, seed=0):
    """Generate the embedded dataset under root in the Karpathy layout, unless its JSON is already there.

    The JSON is written last and atomically, so a half-generated folder is never taken for a finished one.
    """
    root = Path(root)
    if (root / JSON_NAMES["embedded"]).exists():
        return
    sizes = sizes or EMBEDDED_SIZES
    print(f"generating the embedded dataset in {root} ({sizes}) ...", flush=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for split, n in sizes.items():
        for i in range(n):
            objs, img, caps = _make_image(split, i, seed)
            name = f"{split}_{i:05d}.png"
            img.save(root / "images" / name)
            records.append({"filename": name, "split": "val" if split == "dev" else split, "imgid": len(records),
                            "sentences": [{"raw": c} for c in caps],
                            "objects": [dict(zip(("shape", "colour", "size", "position"), o)) for o in objs]})
    atomic_write(root / JSON_NAMES["embedded"], lambda f: f.write(json.dumps({"dataset": "embedded", "images": records}).encode()))


# ---------------------------------------------------------------------------------------------------------
# Loaders
def atomic_write(path, write):
    """write(f) into path.tmp, then rename: a crash never leaves a half-written file at path."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _karpathy(json_path, split):
    try:
        images = json.loads(Path(json_path).read_text())["images"]
        keep = [im for im in images if im["split"] in KARPATHY_SPLITS[split]]
        captions = [[s["raw"].strip() for s in im["sentences"]][:MAX_CAPS] for im in keep]
        files = [os.path.join(im.get("filepath", ""), im["filename"]) for im in keep]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{json_path} is not a Karpathy-layout JSON ({e.__class__.__name__}: {e})")
    if not keep:
        raise UserError(f"{json_path} has no images in split {KARPATHY_SPLITS[split]}")
    root = Path(json_path).parent
    folder = next((d for d in (root / "images", root / "flickr30k-images", root) if (d / files[0]).exists()), root / "images")
    return [str(folder / f) for f in files], captions


def _scan(root, dataset, split):
    d = Path(root) / "annotations" / "scan_split"
    caps = (d / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
    ids = (d / f"{split}_ids.txt").read_text().split()
    if not ids or len(caps) % len(ids):
        raise UserError(f"{d}/{split}_caps.txt has {len(caps)} lines, not a multiple of the {len(ids)} ids")
    ids = np.repeat(ids, len(caps) // len(ids)).tolist()
    order = list(dict.fromkeys(ids))  # images in order of first appearance (COCO 1K folds depend on it)
    if dataset == "f30k":
        names = (d / "image_name.txt").read_text().split()
        files = [names[int(i)] for i in order]
    else:
        files = [f"COCO_2014_{int(i):012d}.jpg" if dataset == "coco" else f"{i}.jpg" for i in order]
    pos = {i: k for k, i in enumerate(order)}
    captions = [[] for _ in order]
    for i, c in zip(ids, caps):
        captions[pos[i]].append(c.strip())
    return [str(Path(root) / "images" / f) for f in files], captions


def load_split(dataset, root, split):
    """Split of dataset in root; split in train/dev/test (and pretrain for embedded)."""
    root = Path(root)
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist (--data-root)")
    names = [JSON_NAMES[dataset]] if dataset in JSON_NAMES else [p.name for p in sorted(root.glob("dataset_*.json"))]
    if names and (root / names[0]).exists():
        paths, captions = _karpathy(root / names[0], split)
    elif dataset != "custom" and (root / "annotations" / "scan_split" / f"{split}_caps.txt").exists():
        paths, captions = _scan(root, dataset, split)
    else:
        raise UserError(f"{root} holds neither {names[0] if names else 'dataset_*.json'} nor annotations/scan_split/{split}_caps.txt")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the {split} split are missing, first: {missing[0]}")
    img_of_cap = np.repeat(np.arange(len(paths)), [len(c) for c in captions])
    return Split(paths, [c for cs in captions for c in cs], img_of_cap)


# ---------------------------------------------------------------------------------------------------------
# Noise: the NCR/NPC protocol, per caption slot
def inject_noise(split, noise, seed, cache_file):
    """Permute the captions of round(noise * N) random caption slots among those slots.

    Returns the noisy split and is_noisy (N,) bool (a caption that lands on a slot of its own image stays
    clean). Deterministic in (noise, seed, N); the permutation is cached whole to cache_file.
    """
    if not 0 <= noise < 1:
        raise UserError(f"--noise must be in [0, 1), got {noise}")
    img_of_cap, n, cache_file = split.img_of_cap, len(split.captions), Path(cache_file)
    src = np.load(cache_file) if cache_file.exists() else None
    if src is None or len(src) != n:
        rng = np.random.default_rng(seed)
        slots = rng.choice(n, round(noise * n), replace=False)
        src = np.arange(n)
        src[slots] = slots[rng.permutation(len(slots))]
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, lambda f: np.save(f, src))
    return split._replace(captions=[split.captions[j] for j in src]), img_of_cap[src] != img_of_cap


def noisy_train(dataset, root, noise, seed):
    """The training split with noise injected; the permutation is cached in root/noise/. -> (split, is_noisy)"""
    cache = Path(root) / "noise" / f"{dataset}_n{noise:g}_s{seed}.npy"
    return inject_noise(load_split(dataset, root, "train"), noise, seed, cache)


def load_image(path, preprocess):
    try:
        with Image.open(path) as im:
            return preprocess(im.convert("RGB"))
    except OSError as e:
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}: {e})") from None


class Pairs(torch.utils.data.Dataset):
    """Caption slot k -> (image (3, H, W), tokens (L,), k)."""

    def __init__(self, split, preprocess, tokenizer):
        self.split, self.preprocess, self.tokenizer = split, preprocess, tokenizer

    def __len__(self):
        return len(self.split.captions)

    def __getitem__(self, k):
        image = load_image(self.split.paths[self.split.img_of_cap[k]], self.preprocess)
        return image, self.tokenizer([self.split.captions[k]])[0], k


class Images(torch.utils.data.Dataset):
    """Image i -> (image (3, H, W), i), each image once (for evaluation)."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.preprocess), i
