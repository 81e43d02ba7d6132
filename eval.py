"""Evaluate a checkpoint, or a pre-trained model zero-shot, on the dev or test split of any dataset.

    python eval.py --checkpoint out/baseline-embedded-n0.4/best.pt             # its own dataset, test split
    python eval.py                                                             # embedded tiny CLIP, zero-shot
    python eval.py --dataset f30k --data-root /data/f30k --pretrained openai   # ViT-B-32 zero-shot
    python eval.py --dataset coco --data-root /data/coco --checkpoint best.pt  # COCO 5K and 1K (5 folds)

Prints R@1/5/10 image-to-text and text-to-image and their sum (rSum); --json also writes them to a file.
"""
import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace

import baseline
import common
import data
import embedded
import runs


def main():
    p = runs.OneLineParser(__doc__)
    p.add_argument("--checkpoint",
                   help="best.pt or last.pt of any script, or a state dict (default: none, zero-shot)")
    p.add_argument("--dataset", choices=data.DATASETS, help="default: the checkpoint's, else embedded")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's, else data/embedded)")
    p.add_argument("--split", default="test", choices=("dev", "test"), help="which split (default: test)")
    p.add_argument("--model",
                   help="open_clip model name (default: the checkpoint's, else nc-tiny / ViT-B-32)")
    p.add_argument("--pretrained",
                   help="zero-shot weights: open_clip tag or file (default: embedded tiny CLIP / openai)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--no-image-cache", action="store_true",
                   help="decode every image with PIL (default: decode once)")
    p.add_argument("--json", help="also write the recalls to this JSON file")
    args = p.parse_args()
    if args.checkpoint and args.pretrained:
        raise data.UserError("--pretrained is for a zero-shot model; a checkpoint brings its own weights: "
                             "give one of --checkpoint and --pretrained")
    if args.json:
        check_json_path(Path(args.json))

    ck = common.load_checkpoint(args.checkpoint) if args.checkpoint else None
    saved = ck.get("args", {}) if ck else {}  # a script's checkpoint; a bare state dict has no "args"
    dataset = args.dataset or saved.get("dataset", "embedded")
    defaults = baseline.EMBEDDED if dataset == "embedded" else baseline.REAL  # the starting model's
    cfg = SimpleNamespace(dataset=dataset, data_root=args.data_root or saved.get("data_root"),
                          model=args.model or saved.get("model") or defaults["model"],
                          pretrained=args.checkpoint or args.pretrained or defaults["pretrained"])
    if cfg.data_root is None:
        if dataset != "embedded":
            raise data.UserError(f"--data-root is required for --dataset {dataset}")
        cfg.data_root = "data/embedded"
    device = common.setup(SimpleNamespace(device=args.device, seed=0))
    if dataset == "embedded" and cfg.pretrained is None:
        cfg.pretrained = embedded.prepare(cfg.data_root, device)
    log = print if ck is None else lambda line: None
    # a checkpoint's weights go into the model its run trained (load_model reads its starting tag's settings)
    model, preprocess, tokenizer = common.load_model(cfg.model, cfg.pretrained, device, log=log)
    split = data.load_split(dataset, cfg.data_root, args.split)
    data.check_ranked(args.split, split.paths)
    pixels = data.Pixels(preprocess, None if args.no_image_cache else data.cache_dir(cfg.data_root))
    r = common.evaluate(model, split, pixels, tokenizer, device, coco_1k=dataset == "coco")
    what = args.checkpoint or f"{cfg.model} {cfg.pretrained or 'embedded pre-trained'} (zero-shot)"
    if cfg.pretrained and Path(cfg.pretrained).is_file():  # the checkpoint, or the zero-shot weights
        what += f", sha256 {embedded.sha256(cfg.pretrained)}"
    print(f"{what} on {dataset} {args.split} ({len(split.paths)} images, {len(split.captions)} captions)")
    print(f"{'5K ' if 'coco1k' in r else ''}{common.fmt(r)}")
    if "coco1k" in r:
        print(common.fmt_1k(r["coco1k"], len(split.paths)))
    if args.json:
        data.atomic_write(args.json, lambda f: f.write(json.dumps(r, indent=1).encode()))


def check_json_path(path):
    """--json may create a file, or replace an earlier eval JSON; never a folder, a file of another kind (the
    checkpoint being read, say) or a file name that a run writes, in a run's folder."""
    if path.is_dir():
        raise data.UserError(f"--json {path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise data.UserError(f"--json {path}: the folder {path.parent} does not exist")
    if any((path.parent / f).exists() for f in runs.RUN_FILES) and \
            any(fnmatch.fnmatch(path.name, pattern) for pattern in (*runs.WRITTEN, runs.LOCK)):
        raise data.UserError(f"--json {path} would replace a file of the run in {path.parent}: "
                             "give another name")
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and {"i2t_r1", "t2i_r1", "rsum"} <= earlier.keys()):
            raise data.UserError(f"--json {path} exists and is not an earlier eval.py JSON: "
                                 "give another name, or delete it")


if __name__ == "__main__":
    runs.run(main)
