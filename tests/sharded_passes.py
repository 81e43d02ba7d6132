"""Run by test_scale.py, alone or under torchrun: the passes whose work the processes share (NPC's and SDD's
neighbour search, NLIP's caption writing), on fixed inputs. Each process saves what it got to OUT/rank<r>.pt.

    python tests/sharded_passes.py EMBEDDED_ROOT OUT
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import captions
import common
import data
import nlip
import npc
import sdd


def main(root, out):
    device = common.setup(SimpleNamespace(device="cpu", seed=0))
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    txt = F.normalize(torch.randn(250, 16, generator=g), dim=1)
    clean = np.flatnonzero(torch.rand(250, generator=g).numpy() > 0.5)
    got = dict(zip(("bank_img", "bank_txt"), npc.neighbours(img, txt, torch.arange(250) // 5, clean)))
    got["nearest"] = npc.nearest(txt, txt[clean], chunk=16)  # 16 chunks, some processes take one more
    # sdd.py's copy
    got["sdd_bank_img"], got["sdd_bank_txt"] = sdd.neighbours(img, txt, torch.arange(250) // 5, clean)

    torch.manual_seed(0)
    clip, preprocess, _ = common.load_model("nc-tiny", "none", device, log=lambda line: None)
    model = nlip.NLIP(clip, nlip.Captioner(30, 128, 1, 128, 3 + 6 + 2)).eval()
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(26)]
    pixels = data.Pixels(preprocess, Path(out) / "cache")  # every process asks for the cache: one builds it
    paths = data.load_split("embedded", root, "train").paths
    images = torch.utils.data.Subset(pixels.images(paths), range(5, 15))
    concepts = torch.randint(4, 30, (10, 3), generator=g)
    for beam in (1, 2):
        flags = SimpleNamespace(max_words=6, beam=beam)
        got[f"beam{beam}"] = captions.write(model, images, concepts, vocab, flags, pixels,
                                                 batch_size=3)  # 4 batches: 2, 2 under 2 processes
    torch.save(got, Path(out) / f"rank{common.rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
