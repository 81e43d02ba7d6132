"""Datasets and noise injection: Flickr30K, MS-COCO, CC120K, custom data, and embedded data (embedded.py).

A split is three parallel facts (class Split): `paths`, one image file per image; `captions`, a list of
strings; `img_of_cap` (N,), the image each caption belongs to. Training samples are caption slots: item k
of the training set is caption k with image img_of_cap[k], and it carries k so methods can keep state.

On-disk layouts (--data-root is the folder holding them):
  Karpathy JSON  dataset_*.json with images[].filename, .split, .sentences[].raw (+ .filepath for COCO);
                 image files under images/, flickr30k-images/ or the root itself.
  SCAN/NPC text  annotations/scan_split/{train,dev,test}_caps.txt (one caption a line) and
                 {split}_ids.txt (one id per caption, or one per image, repeated for its captions).
                 Images under images/: f30k names from annotations/scan_split/image_name.txt (line = id),
                 coco COCO_2014_<id, 12 digits>.jpg, cc120k <id>.jpg."""
import collections
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from tqdm import tqdm


class UserError(Exception):
    """A bad input the user can fix; the scripts print it as one line and exit with status 2."""


class Split(NamedTuple):
    paths: list
    captions: list
    img_of_cap: np.ndarray


DATASETS = ("embedded", "f30k", "coco", "cc120k", "custom")
JSON_NAMES = {"embedded": "dataset_embedded.json", "f30k": "dataset_flickr30k.json",
              "coco": "dataset_coco.json"}
KARPATHY_SPLITS = {"train": ("train", "restval"), "dev": ("val", "dev"), "test": ("test",),
                   "pretrain": ("pretrain",)}
MAX_CAPS = 5  # captions kept per image (COCO has a few images with 6 or 7; the protocol uses 5)


# ---- Loaders
def atomic_write(path, write):
    """write(f) into a temporary file of this process, then rename: a crash never leaves a half-written file
    at path, and two processes writing the same path at once never share a temporary file."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _karpathy(json_path, split):
    try:
        images = json.loads(Path(json_path).read_text(encoding="utf-8"))["images"]
        keep = [im for im in images if im["split"] in KARPATHY_SPLITS[split]]
        captions = [[s["raw"] for s in im["sentences"]][:MAX_CAPS] for im in keep]  # checked in load_split
        files = [os.path.join(im.get("filepath", ""), im["filename"]) for im in keep]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{json_path} is not a Karpathy-layout JSON ({e.__class__.__name__}: {e})")
    if not keep:
        raise UserError(f"{json_path} has no images in split {KARPATHY_SPLITS[split]}")
    root = Path(json_path).parent
    candidates = (root / "images", root / "flickr30k-images", root)
    folder = next((d for d in candidates if (d / files[0]).exists()), root / "images")
    return [str(folder / f) for f in files], captions


def _lines(path):
    """The lines of a text file without its trailing blank lines; a blank line before them is an error."""
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        lines = path.read_text(encoding="utf-8").rstrip().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text, the encoding expected (byte {e.start}: {e.reason})"
                        ) from None
    blank = next((k for k, line in enumerate(lines) if not line.strip()), None)
    if blank is not None:
        raise UserError(f"{path}: line {blank + 1} is blank")
    return lines


def _scan(root, dataset, split):
    d = Path(root) / "annotations" / "scan_split"
    caps, ids = _lines(d / f"{split}_caps.txt"), [i.strip() for i in _lines(d / f"{split}_ids.txt")]
    per = 1 if dataset == "cc120k" else MAX_CAPS  # captions per image if the ids file has one line per image
    per_image = len(caps) == per * len(ids) and len(set(ids)) == len(ids)
    if not ids or (len(ids) != len(caps) and not per_image):
        raise UserError(f"{d}/{split}_caps.txt has {len(caps)} captions for {len(ids)} ids: neither one id "
                        f"a caption nor {per} captions for each of distinct ids")
    ids = ids if len(ids) == len(caps) else np.repeat(ids, per).tolist()
    order = list(dict.fromkeys(ids))  # images in order of first appearance (COCO 1K folds depend on it)
    names = [n.strip() for n in _lines(d / "image_name.txt")] if dataset == "f30k" else []
    bad = [i for i in order
           if dataset != "cc120k" and not (i.isdigit() and (dataset == "coco" or int(i) < len(names)))]
    if bad:
        raise UserError(f"{d}/{split}_ids.txt: the id '{bad[0]}' names no {dataset} image")
    if dataset == "f30k":
        files = [names[int(i)] for i in order]
    else:
        files = [f"COCO_2014_{int(i):012d}.jpg" if dataset == "coco" else f"{i}.jpg" for i in order]
    pos = {i: k for k, i in enumerate(order)}
    captions = [[] for _ in order]
    for i, c in zip(ids, caps):
        captions[pos[i]].append(c.strip())
    return [str(Path(root) / "images" / f) for f in files], [c[:MAX_CAPS] for c in captions]


def load_split(dataset, root, split):
    """Split of dataset in root; split in train/dev/test (and pretrain for embedded)."""
    root = Path(root)
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise UserError(f"data folder {root} {what} (--data-root)")
    names = ([JSON_NAMES[dataset]] if dataset in JSON_NAMES
             else [p.name for p in sorted(root.glob("dataset_*.json"))])
    if len(names) > 1:
        raise UserError(f"{root} holds {len(names)} Karpathy JSON files ({', '.join(names)}); "
                        "--dataset custom needs one")
    if dataset == "custom" and not names and (root / "annotations" / "scan_split").is_dir():
        raise UserError(f"{root} has the SCAN layout, which --dataset custom does not read: "
                        "use f30k, coco or cc120k")
    if names and (root / names[0]).exists():
        paths, captions = _karpathy(root / names[0], split)
    elif dataset != "custom" and (root / "annotations" / "scan_split" / f"{split}_caps.txt").exists():
        paths, captions = _scan(root, dataset, split)
    else:
        raise UserError(f"{root} holds neither {names[0] if names else 'dataset_*.json'} "
                        f"nor annotations/scan_split/{split}_caps.txt")
    check(paths, captions, split)
    img_of_cap = np.repeat(np.arange(len(paths)), [len(c) for c in captions])
    return Split(paths, [c.strip() for cs in captions for c in cs], img_of_cap)


def check(paths, captions, split):
    """Before any work: every image has a caption, every caption is text, every image file opens as an image
    (its header is read: a broken file is named now, not after training)."""
    for path, caps in zip(paths, captions):
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise UserError(f"{split} split: image {path} has no caption, "
                            f"or a caption that is empty or not text: {caps}")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the {split} split are missing, first: {missing[0]}")
    for path in paths:
        try:
            Image.open(path).close()
        except OSError as e:
            raise UserError(f"cannot read image {path} ({e.__class__.__name__}: {e})") from None


# ---- Noise: the NCR/NPC protocol, per caption slot
def inject_noise(split, noise, seed, cache_file):
    """Permute the captions of round(noise * N) random caption slots among those slots.

    Returns the noisy split and is_noisy (N,) bool (a caption landing on a slot of its own image stays clean).
    Deterministic in (noise, seed, N), so computed every time; cache_file keeps a record of it, written whole,
    and rewritten when it holds anything else (another noise rate's or seed's permutation, a broken file)."""
    if not 0 <= noise < 1:
        raise UserError(f"--noise must be in [0, 1), got {noise}")
    img_of_cap, n, cache_file = split.img_of_cap, len(split.captions), Path(cache_file)
    rng = np.random.default_rng(seed)
    slots = rng.choice(n, round(noise * n), replace=False)
    src = np.arange(n)
    src[slots] = slots[rng.permutation(len(slots))]
    try:
        stale = not np.array_equal(np.load(cache_file), src)
    except (OSError, ValueError):  # missing, or not an .npy
        stale = True
    if stale:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, lambda f: np.save(f, src))
    return split._replace(captions=[split.captions[j] for j in src]), img_of_cap[src] != img_of_cap


def noisy_train(dataset, root, noise, seed):
    """The noisy training split -> (split, is_noisy); the permutation is cached in cache_dir(root)/noise/."""
    cache = cache_dir(root) / "noise" / f"{dataset}_n{noise:g}_s{seed}.npy"
    return inject_noise(load_split(dataset, root, "train"), noise, seed, cache)


MIN_RANKED = 11  # images of a dev or test split: t2i recall@10 ranks the images, so 10 or fewer score 100


def check_ranked(name, paths):
    if len(paths) < MIN_RANKED:
        raise UserError(f"the {name} split has {len(paths)} image(s): recall@10 ranks the images, so with 10 "
                        f"or fewer it is 100 for any model; it needs at least {MIN_RANKED}")


def check_splits(pixels, log, train, dev, test):
    """Before the first step: an image listed twice is named (a warning), dev and test can be ranked, no
    train image is in dev or test (an error: the score would be of pairs trained on), and every image of
    every split decodes (building the cache does it once; with no cache, one pass of PIL)."""
    files = {name: [os.path.realpath(p) for p in s.paths] for name, s in
             (("train", train), ("dev", dev), ("test", test))}  # a file under two names is one image
    for name, paths in files.items():
        twice = [p for p, n in collections.Counter(paths).items() if n > 1]
        if twice:
            log(f"warning: {len(twice)} image(s) of the {name} split are listed more than once, first: "
                f"{twice[0]} (its captions count once a listing)")
    both = set(files["dev"]) & set(files["test"])
    if both:
        log(f"warning: {len(both)} image(s) are in both the dev and the test split, first: {min(both)}")
    for name in ("dev", "test"):
        check_ranked(name, files[name])
        both = set(files["train"]) & set(files[name])
        if both:
            raise UserError(f"{len(both)} image(s) of the {name} split are also in the train split, "
                            f"first: {min(both)}")
    for split in (train, dev, test):
        images = pixels.images(split.paths)  # with the cache, built now: every file decoded once
        if pixels.folder is None:
            for _ in torch.utils.data.DataLoader(images, 64, num_workers=pixels.workers):
                pass  # a broken file raises here, before any training


class Pairs(torch.utils.data.Dataset):
    """Caption slot k -> (image uint8 (3, S, S), tokens (L,), k); images from Pixels.images."""

    def __init__(self, split, pixels, tokenizer):
        self.split, self.images, self.tokenizer = split, pixels.images(split.paths), tokenizer

    def __len__(self):
        return len(self.split.captions)

    def __getitem__(self, k):
        return self.images[self.split.img_of_cap[k]][0], self.tokenizer([self.split.captions[k]])[0], k


# ---- Images: decoded once into a uint8 cache (or per sample with PIL), normalised on the device
def cache_dir(root):
    """Where the caches of the data in root go (noise permutations, decoded images): root itself if writable,
    else $NC_CACHE or ~/.cache/noisy-correspondence, in a folder named after root's absolute path."""
    if os.access(root, os.W_OK):
        return Path(root)
    home = Path(os.environ.get("NC_CACHE") or Path.home() / ".cache" / "noisy-correspondence")
    folder = home / hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{root} is read-only and its caches cannot go to {home} either ({e.strerror}): set "
                        "$NC_CACHE to a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{root} is read-only and so is {folder}: set $NC_CACHE to a writable folder")
    return folder


class Pixels:
    """open_clip's preprocess cut in two. Its PIL steps (resize, crop, RGB) turn a file into uint8 (3, S, S),
    via a decode-once cache (a memory-mapped .npy under folder, built on first use) or, with folder None, per
    sample; normalize() does its ToTensor and Normalize on a batch, on the device, with the same float ops."""

    def __init__(self, preprocess, folder=None, workers=0):
        steps = list(preprocess.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, transforms.ToTensor)), None)
        if cut is None or len(steps) != cut + 2 or not isinstance(steps[-1], transforms.Normalize):
            raise UserError(f"cannot cut this preprocess into PIL steps, ToTensor, Normalize: {preprocess}")
        self.pil, self.folder, self.workers = transforms.Compose(steps[:cut]), folder, workers
        self.mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(steps[-1].std, dtype=torch.float32).view(3, 1, 1)

    def normalize(self, x):
        """x uint8 (B, 3, S, S) -> float (B, 3, S, S), as ToTensor then Normalize would give."""
        return (x.float().div(255) - self.mean.to(x.device)) / self.std.to(x.device)

    def images(self, paths):
        """A dataset of the images at paths: i -> (uint8 (3, S, S), i)."""
        if self.folder is None:
            return Decoded(paths, self.pil)
        steps = re.sub(r" at 0x[0-9a-f]+", "", repr(self.pil))  # the transform, without memory addresses
        try:  # one stat a file: a changed file (its size or time) makes a new cache
            files = [f"{p} {s.st_size} {s.st_mtime_ns}" for p in paths for s in [os.stat(p)]]
        except OSError as e:
            raise UserError(f"cannot read image {e.filename} ({e.strerror})") from None
        key = hashlib.sha1("\n".join([steps, *files]).encode()).hexdigest()[:16]
        path = Path(self.folder) / "image-cache" / f"{len(paths)}-images-{key}.npy"
        if not whole(path, len(paths)):
            path.parent.mkdir(parents=True, exist_ok=True)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                fcntl.flock(folder, fcntl.LOCK_EX)  # one builder; a concurrent run waits, then reads its file
                if path.exists() and not whole(path, len(paths)):  # written whole, so damaged since
                    print(f"{path} is damaged (truncated?): decoding the images again", flush=True)
                    path.unlink()
                if not path.exists():
                    build_cache(path, Decoded(paths, self.pil), self.workers)
            finally:
                os.close(folder)
        return Cached(path)


def whole(path, n):
    """Whether path holds a readable cache of n images (its header, and a file as long as it says)."""
    try:
        return np.load(path, mmap_mode="r").shape[0] == n
    except (OSError, ValueError, EOFError):
        return False


def build_cache(path, images, workers):
    """Decode every image once into path (.npy, uint8 (n, 3, S, S)), written whole: temp file, then rename."""
    shape = images[0][0].shape
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), *shape))
        # its own generator keeps the global one as it was (embedded.pretrain_tiny's shuffles draw from it)
        loader = torch.utils.data.DataLoader(images, 64, num_workers=workers, generator=torch.Generator())
        for x, i in tqdm(loader, f"decoding {len(images)} images once into {path.name}", disable=None):
            array[i[0]:i[-1] + 1] = x.numpy()
        array.flush()
        del array
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Decoded(torch.utils.data.Dataset):
    """Image i -> (uint8 (3, S, S), i), decoded from its file with PIL for every access."""

    def __init__(self, paths, pil):
        self.paths, self.pil = paths, pil

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                pixels = np.asarray(self.pil(im.convert("RGB")), dtype=np.uint8)  # (S, S, 3)
        except OSError as e:
            raise UserError(f"cannot read image {self.paths[i]} ({e.__class__.__name__}: {e})") from None
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), i


class Cached(torch.utils.data.Dataset):
    """Image i -> (uint8 (3, S, S), i), read from the cache file (memory-mapped, opened in each worker)."""

    def __init__(self, path):
        self.path, self.array = path, None

    def __len__(self):
        return len(self._open())

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self._open()[i])), i

    def _open(self):
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r")
        return self.array

    def __getstate__(self):  # a worker process maps the file itself
        return {"path": self.path, "array": None}
