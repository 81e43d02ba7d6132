"""The embedded setting: a generated image-caption dataset and a tiny CLIP pre-trained on its own clean split.

It mirrors the real setting, fine-tuning a *pre-trained* CLIP on noisy pairs,
at a size that runs on 2 CPU cores:
  - images: 2-3 shapes (6 shapes x 8 colours, 2 sizes, a 3x3 grid of positions), drawn at 128 px,
    kept at 64 px;
  - captions: 5 per image, naming the objects in random order, sometimes leaving one out, with synonyms,
    several templates, and size and position words half the time;
  - splits: pretrain 10,000 images, train 4,000, dev 1,000, test 1,000, written in the Karpathy JSON layout
    (dataset_embedded.json + images/), so data.py's real loader reads them;
  - the domain shift that fine-tuning learns: the pretrain split has plain backgrounds half the time, terse
    alt-text captions 70% of the time ("red circle, blue star"), and never shows 12 of the 48 colour-shape
    pairs;
  - nc-tiny (common.py) pre-trained on the pretrain split is the embedded `--pretrained`, as 'openai' is
    for real data.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw

import common
import data
import runs

SHAPES = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle", "wedge"),
          "diamond": ("diamond", "rhombus"), "hexagon": ("hexagon", "honeycomb"), "star": ("star", "starlet")}
COLOURS = {"red": ((215, 35, 35), ("red", "crimson")), "green": ((35, 175, 60), ("green", "emerald")),
           "blue": ((40, 80, 225), ("blue", "azure")), "yellow": ((240, 225, 40), ("yellow", "golden")),
           "purple": ((140, 50, 185), ("purple", "violet")), "orange": ((250, 140, 20), ("orange", "amber")),
           "pink": ((250, 125, 190), ("pink", "rose")), "cyan": ((50, 215, 225), ("cyan", "turquoise"))}
SIZES = {"small": ("small", "little"), "large": ("large", "big")}
POSITIONS = (("top left", "upper left"), ("top", "top middle"), ("top right", "upper right"),
             ("left", "middle left"), ("center", "middle"), ("right", "middle right"),
             ("bottom left", "lower left"), ("bottom", "bottom middle"), ("bottom right", "lower right"))
TEMPLATES = ("{}", "a picture of {}", "an image showing {}", "there is {}", "{} on a patterned background",
             "a photo with {}")
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
# never in pre-training
HELD_OUT = {PAIRS[i] for i in np.random.default_rng(0).choice(len(PAIRS), 12, replace=False)}
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
        arr = base + stripes[..., None] * rng.integers(-25, 26, 3) + rng.normal(0, 10, (size, size, 3))
    else:
        arr = np.broadcast_to(base, (size, size, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s, c, z, p in objs:
        cx, cy = (np.array([p % 3, p // 3]) + 0.5) * size / 3 + rng.integers(-4, 5, 2)
        r = (12 if z == "small" else 19) + rng.integers(-1, 2)
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
        if len(caps) == data.MAX_CAPS:
            break
    caps += [caps[-1]] * (data.MAX_CAPS - len(caps))
    return objs, img, caps


def ensure_embedded(root, sizes=None, seed=0):
    """Generate the embedded dataset under root in the Karpathy layout, unless its JSON is already there.

    The JSON is written last and atomically, so a half-generated folder is never taken for a finished one.
    """
    root = Path(root)
    if (root / data.JSON_NAMES["embedded"]).exists():
        return
    parent = next(p for p in (root, *root.parents) if p.exists())  # the nearest part of the path that exists
    if not parent.is_dir():
        raise data.UserError(f"--data-root {root}: {parent} is a file, not a folder")
    sizes = sizes or EMBEDDED_SIZES
    print(f"{root} holds no {data.JSON_NAMES['embedded']}: generating the embedded dataset there, once "
          f"({sum(sizes.values())} images {sizes}; with pre-training about 4-5 min on 2 cores; "
          "check --data-root if you meant another folder)", flush=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for split, n in sizes.items():
        for i in range(n):
            objs, img, caps = _make_image(split, i, seed)
            name = f"{split}_{i:05d}.png"
            img.save(root / "images" / name)
            records.append({"filename": name, "split": "val" if split == "dev" else split,
                            "imgid": len(records), "sentences": [{"raw": c} for c in caps],
                            "objects": [dict(zip(("shape", "colour", "size", "position"), o)) for o in objs]})
    index = json.dumps({"dataset": "embedded", "images": records}).encode()
    data.atomic_write(root / data.JSON_NAMES["embedded"], lambda f: f.write(index))


MARK = ".generated"  # in a folder of generated data that may be written again


def write_f30k_like(root, sizes, image_size=(500, 375), seed=0):
    """Generated JPEGs of Flickr's size in the F30K Karpathy layout (dataset_flickr30k.json,
    flickr30k-images/), sizes {"train": n, "dev": n, "test": n}: real-data loading, the image cache and its
    speed, without the data. It writes only into a folder that is new, empty or marked as its own (MARK), so
    never over a real dataset."""
    root = Path(root)
    if root.exists() and not (root.is_dir() and (not any(root.iterdir()) or (root / MARK).is_file())):
        raise data.UserError(f"{root} holds files that generated data did not write: give a new or empty "
                             "folder for generated data")
    (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    (root / MARK).write_text("generated by embedded.write_f30k_like: the files here may be replaced\n")
    records = []
    for split, n in sizes.items():
        for i in range(n):
            objs, _, caps = _make_image(split, i, seed)
            rng = np.random.default_rng([seed, SPLIT_IDS[split], i, 1])
            side = max(image_size)
            img = _render(objs, rng, textured=True, size=side, out=side).crop((0, 0, *image_size))
            name = f"{split}_{i:05d}.jpg"
            img.save(root / "flickr30k-images" / name, quality=90)
            records.append({"filename": name, "split": "val" if split == "dev" else split,
                            "sentences": [{"raw": c} for c in caps]})
    index = json.dumps({"images": records}).encode()
    data.atomic_write(root / data.JSON_NAMES["f30k"], lambda f: f.write(index))


def zero_shot(clip, img, root, tokenizer, device):
    """Zero-shot classification of the test images, img (n, D) their normalised features, by shape, colour and
    colour-shape pair, prompt "a photo of a {class}". A top-1 class counts as right if the image holds it (2-3
    objects each); chance is the mean share of the classes an image holds.
    -> {"shape": {"accuracy", "chance"}, "colour": ...}"""
    records = json.loads((Path(root) / data.JSON_NAMES["embedded"]).read_text())["images"]
    objects = [[(o["shape"], o["colour"]) for o in im["objects"]] for im in records if im["split"] == "test"]
    out = {}
    for name, classes, held in (("shape", list(SHAPES), lambda objs: {s for s, _ in objs}),
                                ("colour", list(COLOURS), lambda objs: {c for _, c in objs}),
                                ("colour shape", [f"{c} {s}" for c, s in PAIRS],
                                 lambda objs: {f"{c} {s}" for s, c in objs})):
        prompts = tokenizer([f"a photo of a {c}" for c in classes]).to(device)
        t = clip.encode_text(prompts, normalize=True).float()  # (C, D)
        pred = (img @ t.T).argmax(1).tolist()
        out[name] = {"accuracy": float(np.mean([classes[p] in held(objs) for p, objs in zip(pred, objects)])),
                     "chance": float(np.mean([len(held(objs)) / len(classes) for objs in objects]))}
    return out


# as measured in shared/EMBEDDED.md
PRETRAIN = {"steps": 800, "batch_size": 128, "lr": 1e-3, "wd": 0.1, "warmup": 100}
# the CPU threads of the pre-training, whatever the machine: the order of a product's sums depends on the
# threads, so 1 and 2 threads gave two different builds (zero-shot rSum 227.1 both, other recalls). It also
# depends on the CPU's vector kernels: three machines built three different weights (the README's results),
# and pinning the kernels to AVX2 did not make an Intel and an AMD build agree, so the sha256 names a build.
PRETRAIN_THREADS = 2


def prepare(root, device, log=print, pretrain=True):
    """Generate the dataset and pre-train nc-tiny on first use (rank 0 only); returns the pre-trained
    weights file."""
    if common.rank() == 0:
        ensure_embedded(root)
        if pretrain:
            pretrain_tiny(root, device, log)
    if common.world() > 1:
        torch.distributed.barrier()  # the other processes wait for the files
    return str(Path(root) / "nc-tiny-pretrained.pt")


def pretrain_tiny(root, device, log=print, **overrides):
    """Pre-train nc-tiny once on the clean pre-training split of the embedded data (the embedded analogue
    of OpenAI's CLIP); cached as root/nc-tiny-pretrained.pt, which it returns. One random caption per image
    a pass, on PRETRAIN_THREADS CPU threads whatever the cores, so that the cores do not change the build."""
    hp, path = dict(PRETRAIN, **overrides), Path(root) / "nc-tiny-pretrained.pt"
    if path.exists():
        return str(path)
    log(f"pre-training nc-tiny on the embedded pre-training split ({hp}); cached in {path}")
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        return _pretrain(root, path, hp, device, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(root, path, hp, device, log):
    torch.manual_seed(0)
    model, preprocess, tokenizer = common.load_model("nc-tiny", "none", device, log)
    pixels = data.Pixels(preprocess, root)
    split = data.load_split("embedded", root, "pretrain")
    first = np.searchsorted(split.img_of_cap, np.arange(len(split.paths)))  # each image's first caption
    counts = np.bincount(split.img_of_cap)  # captions per image
    opt, rng, step = runs.optimizer(model, hp["lr"], hp["wd"]), np.random.default_rng(0), 0
    clip_loss = open_clip.ClipLoss()  # mean_i common.info_nce, by open_clip: a course copy blanks the latter
    while step < hp["steps"]:
        pairs = torch.utils.data.Subset(data.Pairs(split, pixels, tokenizer),
                                        (first + rng.integers(0, counts)).tolist())  # a caption of each image
        batches = torch.utils.data.DataLoader(pairs, hp["batch_size"], shuffle=True, drop_last=True)
        for images, tokens, _ in batches:
            runs.set_lr(opt, step, hp["steps"], hp["warmup"], hp["lr"])
            img, txt, scale = model(pixels.normalize(images.to(device)), tokens.to(device))
            loss = clip_loss(img, txt, scale)  # rank 0 alone
            runs.train_step(model, opt, loss)
            step += 1
            if step % 100 == 0 or step == hp["steps"]:
                log(f"pretrain step {step:4d}/{hp['steps']}  loss {loss.item():.4f}")
            if step == hp["steps"]:
                break
    test = data.load_split("embedded", root, "test")
    r = common.evaluate(model, test, pixels, tokenizer, device, local=True)
    log(f"nc-tiny zero-shot test: {common.fmt(r)}")
    common.save_checkpoint(path, model.state_dict())
    log(f"nc-tiny pre-trained weights: {path}, sha256 {sha256(path)} (the README names its build)")
    return str(path)


def sha256(path):
    """The first 16 hex digits of a file's SHA-256: which build of the weights a figure came from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
