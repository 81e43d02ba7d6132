"""Plain CLIP fine-tuning on noisy pairs: the baseline every noisy-correspondence paper compares against.

A pre-trained CLIP is fine-tuned with the symmetric InfoNCE loss on every training pair, clean or not.
With --clean-only it trains on the truly clean pairs only: the upper bound a robust method aims at.

    python baseline.py                      # embedded data, tiny CLIP, CPU, about 3 minutes
    python baseline.py --noise 0            # clean fine-tune
    python baseline.py --clean-only         # upper bound: the clean pairs of the noise-0.4 set
    python baseline.py --dataset f30k --data-root /data/f30k --noise 0.4   # ViT-B-32 'openai' on a GPU
    torchrun --standalone --nproc_per_node=4 baseline.py --dataset coco --data-root /data/coco


Official settings (NPC's CLIP baseline), the real-data defaults: AdamW betas (0.9, 0.98), eps 1e-6, weight decay
0.2, 500 warm-up steps then cosine, grad-norm clip 10, batch 256, 5 epochs, seed 99, 224 px, no augmentation.
Deviations, and why:
  - lr 1e-5, not 5e-7: the official value was tuned for pure-fp16 weights, where most AdamW updates underflow;
    with fp32 weights and bf16 autocast it barely moves the model (the same lab's later code uses about 1e-5).
  - the schedule counts optimiser steps; the official one counts samples, so its lr is nearly flat in an epoch.
  - model selection by dev rSum, and best.pt is only replaced by a better epoch.
  - --clean-only keeps the number of epochs, so it takes fewer steps than the noisy run.
Embedded defaults (measured, see README): batch 128, lr 5e-4, 50 warm-up steps, 3 epochs.
"""
import time

import numpy as np
import torch

import common
import data


def main():
    p = common.parser(__doc__)
    p.add_argument("--clean-only", action="store_true", help="train on the truly clean pairs only (upper bound)")
    args = common.parse(p, "baseline")
    method = "baseline-clean" if args.clean_only else "baseline"

    # ---- setup
    device = common.setup(args)
    log = common.Log(args.out_dir)
    log(f"{method}: {vars(args)}")

    # ---- data
    model, preprocess, tokenizer = common.load_model(args, device, log)
    train, is_noisy = data.noisy_train(args.dataset, args.data_root, args.noise, args.noise_seed)
    dev, test = (data.load_split(args.dataset, args.data_root, s) for s in ("dev", "test"))
    log(f"data: {len(train.paths)} train images, {len(is_noisy)} captions, {is_noisy.mean():.3f} noisy "
        f"(asked {args.noise}); dev {len(dev.paths)}, test {len(test.paths)} images")
    pairs = data.Pairs(train, preprocess, tokenizer)
    if args.clean_only:
        pairs = torch.utils.data.Subset(pairs, np.flatnonzero(~is_noisy).tolist())
    loader = common.loader(pairs, args)
    if len(loader) == 0:
        raise data.UserError(f"{len(pairs)} training pairs make no full batch of {args.batch_size}")

    # ---- model and optimiser
    opt = common.optimizer(model, args.lr, args.wd)
    net = common.wrap(model, device)
    total = args.epochs * len(loader)
    start, best, history = common.resume(args, method, model, opt) if args.resume else (0, -1.0, [])
    if start == 0:
        history.append(dict(epoch=0, dev=common.evaluate(model, dev, preprocess, tokenizer, device)))
        log(f"start: dev {common.fmt(history[0]['dev'])}")
    else:
        log(f"resumed from {args.out_dir}/last.pt at epoch {start + 1}")

    # ---- training: l = mean_i l_i over every pair of the batch
    for epoch in range(start, args.epochs):
        model.train()
        loader.sampler.set_epoch(epoch)
        t0, losses = time.time(), []
        for i, (images, tokens, _) in enumerate(loader):
            common.set_lr(opt, common.cosine_lr(epoch * len(loader) + i, total, args.warmup, args.lr))
            with common.autocast(device):
                img, txt, scale = net(images.to(device), tokens.to(device))
                loss = common.info_nce(img, txt, scale).mean()
            common.train_step(net, opt, loss)
            losses.append(loss.item())
        dev_r = common.evaluate(model, dev, preprocess, tokenizer, device)
        history.append(dict(epoch=epoch + 1, loss=float(np.mean(losses)), time_s=time.time() - t0, dev=dev_r))
        log(f"epoch {epoch + 1}/{args.epochs}  loss {np.mean(losses):.4f}  time {time.time() - t0:5.1f}s  "
            f"dev {common.fmt(dev_r)}")
        best = common.save_epoch(args, method, model, opt, epoch, best, history)

    # ---- test with the best dev checkpoint
    common.finish(args, method, model, test, preprocess, tokenizer, device, log, history,
                  extra=dict(noise_rate=float(is_noisy.mean())))


if __name__ == "__main__":
    common.run(main)
