"""Plain CLIP fine-tuning on noisy pairs: the baseline every noisy-correspondence paper compares against.

A pre-trained CLIP is fine-tuned with the symmetric InfoNCE loss on every training pair, clean or not. The
loss is open_clip's own (ClipLoss: the batch mean of common.info_nce, with the same gradient to the bit), so
this file runs in a course copy whose common.info_nce is a blank exercise (exercises.py).
With --clean-only it trains on the truly clean pairs only: the upper bound a robust method aims at.

    python baseline.py                  # embedded data, tiny CLIP, CPU: 2.5 min (first run: +4 min of set-up)
    python baseline.py --noise 0        # clean fine-tune
    python baseline.py --clean-only     # upper bound: the clean pairs of the noise-0.4 set
    python baseline.py --dataset f30k --data-root /data/f30k --noise 0.4     # ViT-B-32 'openai' on a GPU
    torchrun --standalone --nproc_per_node=4 baseline.py --dataset coco --data-root /data/coco

Official settings (NPC's CLIP baseline, github.com/ZhangXu0963/NPC main_CLIP.py at 823d781), the real-data
defaults: AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.2, 500 warm-up steps then cosine, batch 256,
5 epochs, seed 99, 224 px, no augmentation.
Deviations, and why:
  - lr 1e-5, not 5e-7 (NPC README.md:201): the official matrices train in fp16 (clip/model.py:466 converts
    them, clip/clip.py:139-141 keeps them so on a GPU, and convert_models_to_fp32, main_CLIP.py:21, is never
    called), their AdamW moments with them; with fp32 weights and bf16 autocast 5e-7 barely moves the model.
    OSA's official code, by the author of the framework main_CLIP.py builds on (NPC README.md:199), trains at
    1e-5 (OSA README.md:109).
  - the gradient norm clipped at 10, as NPC's and SDD's own steps (main_NPC.py:190, main_SDD_sim.py:239),
    so that every script here takes the same step; main_CLIP.py does not clip (:113-115).
  - no weight decay on biases, gains and logit_scale, and the logit scale clamped to ln 100 after each step,
    as open_clip's training code (runs.optimizer, runs.train_step); main_CLIP.py:85 decays every parameter
    and never clamps.
  - the schedule counts optimiser steps; the official one counts samples (main_CLIP.py:83, :99), so its lr
    is nearly flat in an epoch.
  - model selection by dev rSum, and best.pt is only replaced by a better epoch.
  - --clean-only keeps the number of epochs, so it takes fewer steps than the noisy run.
The embedded defaults (batch 128, lr 5e-4, 50 warm-up steps, 3 epochs) were measured: see the README.
Infrastructure: images come from a decode-once uint8 cache and are normalised on the device (data.Pixels;
--no-image-cache: PIL per sample); --precision bf16 (CUDA's default) autocasts the forward; --compile
compiles the training forward and backward, while evaluation stays eager (it calls the model's encoders,
on a changing last batch).
"""
import functools
import time

import numpy as np
import open_clip
import torch

import common
import data
import embedded
import runs

# ---- defaults of the two settings: --dataset embedded takes the first, any other dataset the second
EMBEDDED = {  # the generated data and the tiny CLIP on 2 CPU cores (README, "The embedded setting")
    "data_root": "data/embedded", "model": "nc-tiny", "pretrained": None, "noise": 0.4,
    "epochs": 3, "batch_size": 128, "lr": 5e-4, "warmup": 50, "workers": 0,
}
REAL = {  # Flickr30K, MS-COCO, CC120K on a GPU: the official settings, except the lr (see above)
    "data_root": None, "model": "ViT-B-32", "pretrained": "openai", "noise": 0.4,
    "epochs": 5, "batch_size": 256, "lr": 1e-5, "warmup": 500, "workers": 8,
}

# ---- flags (-h shows every default; None here: the setting's value, from the dicts above)
parser = runs.Parser(__doc__, EMBEDDED, REAL)
parser.add_argument("--dataset", default="embedded", choices=data.DATASETS, help="the data")
parser.add_argument("--data-root", help="dataset folder (embedded: generated on first use)")
parser.add_argument("--noise", type=float, help="share of training captions shuffled, in [0, 1)")
parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise permutation")
parser.add_argument("--model", help="open_clip model name (nc-tiny: the embedded CPU model)")
parser.add_argument("--pretrained", help="open_clip tag, weights file or none (embedded None: the tiny CLIP)")
parser.add_argument("--epochs", type=int, help="training epochs")
parser.add_argument("--batch-size", type=int, help="pairs per optimiser step, over all processes")
parser.add_argument("--lr", type=float, help="peak learning rate of AdamW")
parser.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay")
parser.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay, official")
parser.add_argument("--seed", type=int, default=99, help="training seed, official")
parser.add_argument("--workers", type=int, help="DataLoader worker processes (at most the cores)")
parser.add_argument("--out-dir", help="log, checkpoints, results (default: out/<method>-<dataset>-n<noise>)")
parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if there is a GPU)")
parser.add_argument("--resume", action="store_true", help="continue the run in out-dir from its last.pt")
parser.add_argument("--overwrite", action="store_true", help="delete the run already in out-dir, start again")
parser.add_argument("--no-image-cache", action="store_true", help="decode every image with PIL each time")
parser.add_argument("--precision", choices=("bf16", "fp32"), help="autocast of forwards (CUDA default: bf16)")
parser.add_argument("--compile", action="store_true", help="torch.compile the training forward and backward")
parser.add_argument("--clean-only", action="store_true", help="train on the truly clean pairs only (bound)")

def main():
    args = parser.parse_args()  # with the defaults of the setting --dataset picks, checked (runs.Parser)
    method = "baseline-clean" if args.clean_only else "baseline"
    runs.claim_out_dir(args, method)  # refuses a folder holding another run, unless --resume or --overwrite

    # ---- setup
    device = common.setup(args)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")  # fp32 weights
    log = runs.logger(args.out_dir)
    runs.log_flags(log, method, args)
    weights = args.pretrained  # args stay as given: --resume compares them with the checkpoint's
    if args.dataset == "embedded" and weights is None:
        weights = embedded.prepare(args.data_root, device, log)  # the data and the tiny CLIP, on first use

    # ---- data, then the pre-trained model (its preprocessing and tokenizer make the samples)
    train, is_noisy = data.noisy_train(args.dataset, args.data_root, args.noise, args.noise_seed)
    dev, test = (data.load_split(args.dataset, args.data_root, s) for s in ("dev", "test"))
    log(f"data: {len(train.paths)} train images, {len(is_noisy)} captions, {is_noisy.mean():.3f} noisy "
        f"(asked {args.noise}); dev {len(dev.paths)}, test {len(test.paths)} images")
    model, preprocess, tokenizer = common.load_model(args.model, weights, device, log)
    cache = None if args.no_image_cache else data.cache_dir(args.data_root)
    pixels = data.Pixels(preprocess, cache, args.workers)
    data.check_splits(pixels, log, train, dev, test)  # every image decodes, no split leaks into another
    evaluate = functools.partial(common.evaluate, pixels=pixels, tokenizer=tokenizer, device=device)
    pairs = data.Pairs(train, pixels, tokenizer)
    if args.clean_only:
        pairs = torch.utils.data.Subset(pairs, np.flatnonzero(~is_noisy).tolist())
    loader = runs.loader(pairs, args.batch_size, args.workers, args.seed)
    if len(loader) == 0:
        raise data.UserError(f"{len(pairs)} training pairs make no full batch of {args.batch_size}")

    # ---- optimiser, DDP, resume
    opt = runs.optimizer(model, args.lr, args.wd)
    net = model
    if common.world() > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:
        net = torch.compile(net)
    total = args.epochs * len(loader)
    clip_loss = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=common.rank(),
                                   world_size=common.world())  # under DDP as info_nce: B rows, n columns
    start = 0
    history = []
    if args.resume:
        start, history = runs.resume(args, model, opt)
        log(f"resumed from {args.out_dir}/last.pt at epoch {start + 1}")
    else:
        history.append({"epoch": 0, "dev": evaluate(model, dev)})
        log(f"start: dev {common.fmt(history[0]['dev'])}")

    # ---- training: l = mean_i l_i over every pair of the batch
    for epoch in range(start, args.epochs):
        model.train()
        common.start_epoch(loader, args, epoch)
        t0, losses, trained = time.time(), [], []
        for i, (images, tokens, k) in enumerate(loader):
            runs.set_lr(opt, epoch * len(loader) + i, total, args.warmup, args.lr)
            images = pixels.normalize(images.to(device))  # (B, 3, H, W)
            tokens = tokens.to(device)  # (B, L)
            with amp:
                img, txt, scale = net(images, tokens)  # (B, D), (B, D) normalised, ()
                loss = clip_loss(img, txt, scale)  # mean_i l_i
            runs.train_step(net, opt, loss)
            losses.append(loss.item())
            trained.append(common.gather(k.to(device)))  # the caption slots trained on, in every process
        train_s = time.time() - t0
        dev_r = evaluate(model, dev)
        loss = common.global_mean(losses)  # the epoch's mean over every process
        noisy_trained = float(is_noisy[torch.cat(trained).cpu().numpy()].mean())  # 0 with --clean-only
        history.append({"epoch": epoch + 1, "loss": loss, "noisy_trained": noisy_trained, "time_s": train_s,
                        "dev": dev_r})
        log(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  train {train_s:5.1f}s  "
            f"dev {common.fmt(dev_r)}")
        runs.save_epoch(args, method, model, opt, history)

    # ---- test with the best dev checkpoint
    runs.finish(args, method, model, evaluate, test, history, extra={"noise_rate": float(is_noisy.mean())})


if __name__ == "__main__":
    runs.run(main)
