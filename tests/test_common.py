"""Per-sample InfoNCE, the GMM helper, checkpoints, weights resolution, the tiny model, --compile."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import runs
from data import UserError


def test_pair_losses_are_infonce_within_seeded_batches():
    torch.manual_seed(0)
    img, txt = (F.normalize(torch.randn(10, 8, dtype=torch.float64), dim=1) for _ in range(2))
    assert torch.allclose(common.pair_losses(img, txt, 5.0, batch_size=10), common.info_nce(img, txt, 5.0))
    got = common.pair_losses(img, txt, 5.0, batch_size=4, seed=3)
    groups = torch.randperm(10, generator=torch.Generator().manual_seed(3)).split(4)  # 4 + 4 + 2 pairs
    for b in groups:
        assert torch.allclose(got[b], common.info_nce(img[b], txt[b], 5.0))
    assert not torch.allclose(got, common.info_nce(img, txt, 5.0))  # fewer negatives, other losses
    assert torch.equal(got, common.pair_losses(img, txt, 5.0, batch_size=4, seed=3))


def test_gmm_separates_two_clusters():
    rng = np.random.default_rng(0)
    loss = np.concatenate([rng.normal(0.5, 0.1, 300), rng.normal(3.0, 0.3, 200)])
    p = common.gmm_clean_prob(loss)
    assert (p[:300] > 0.9).all() and (p[300:] < 0.1).all()
    sim = -loss  # for a similarity the clean component is the higher one
    assert np.allclose(common.gmm_clean_prob(sim, higher_is_clean=True), p, atol=1e-6)


def test_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    lrs = [runs.set_lr(opt, s, 100, 10, 1.0) for s in range(100)]
    assert opt.param_groups[0]["lr"] == lrs[-1]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 0.01


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = torch.nn.Linear(3, 2)
    common.save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "epoch": 4, "args": {"lr": 0.1}})
    ck = common.load_checkpoint(tmp_path / "c.pt")
    assert ck["epoch"] == 4 and torch.equal(ck["model"]["weight"], model.weight)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(UserError, match="not found"):
        common.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint .*not a torch.save file") as e:
        common.load_checkpoint(tmp_path / "bad.pt")
    assert "weights_only" not in str(e.value)  # never a hint to load a file unsafely
    # a truncated checkpoint: its cause stays
    (tmp_path / "cut.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:300])
    want = "cannot read checkpoint .*cut.pt .*zip archive: failed finding central directory"
    with pytest.raises(UserError, match=want):
        common.load_checkpoint(tmp_path / "cut.pt")


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path):
    common.save_checkpoint(tmp_path / "c.pt", {"epoch": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        common.save_checkpoint(tmp_path / "c.pt", {"epoch": 2, "x": Boom()})
    assert common.load_checkpoint(tmp_path / "c.pt") == {"epoch": 1}


def test_unreachable_weights_fail_fast_in_one_line(monkeypatch):
    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(common.socket, "create_connection", no_network)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(UserError) as e:
        common.resolve_weights("ViT-B-32", "openai")
    msg = str(e.value)
    assert "\n" not in msg and "unreachable" in msg and "--pretrained /path/to/weights" in msg
    with pytest.raises(UserError, match="neither a file nor a tag"):
        common.resolve_weights("ViT-B-32", "no-such-tag")
    assert common.resolve_weights("ViT-B-32", "none") == (None, {})


def test_tiny_model_is_registered_and_loads_a_local_file(tmp_path):
    import open_clip
    model = open_clip.create_model("nc-tiny")
    assert model.visual.image_size == (64, 64) and model.context_length == 32
    torch.save(model.state_dict(), tmp_path / "w.pt")
    path, kwargs = common.resolve_weights("nc-tiny", str(tmp_path / "w.pt"))
    again = open_clip.create_model("nc-tiny", pretrained=path, **kwargs)
    assert torch.equal(again.logit_scale, model.logit_scale)


def test_compiled_steps_give_the_eager_losses():
    """--compile: torch.compile'd forward and backward, two optimiser steps on nc-tiny, against
    eager (CPU)."""
    torch.manual_seed(0)
    model = common.load_model("nc-tiny", "none", torch.device("cpu"), log=lambda line: None)[0]
    twin = copy.deepcopy(model)
    images, tokens = torch.randn(8, 3, 64, 64), torch.randint(1, 49407, (8, 32))
    losses = {}
    for name, net in (("eager", model), ("compiled", torch.compile(twin))):
        opt = runs.optimizer(getattr(net, "_orig_mod", net), 1e-3, 0.2)
        losses[name] = []
        for _ in range(3):
            loss = common.info_nce(*net(images, tokens)).mean()
            runs.train_step(net, opt, loss)
            losses[name].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert losses["eager"][2] < losses["eager"][0] - 0.1  # the steps moved the model
    assert all(torch.allclose(p, q, atol=1e-4) for p, q in zip(model.parameters(), twin.parameters()))


def test_chunked_is_fn_on_every_chunk_in_order():
    got = common.chunked(lambda lo, hi: torch.arange(lo, hi)[:, None] * torch.tensor([1, -1]), 10, 4)
    assert got.tolist() == [[i, -i] for i in range(10)]


def test_a_checkpoint_of_these_scripts_is_accepted_as_pretrained(tmp_path):
    torch.manual_seed(1)
    import open_clip
    tuned = open_clip.create_model("nc-tiny")
    ck = {"method": "baseline", "args": {"model": "nc-tiny", "pretrained": None}, "model": tuned.state_dict(),
          "epoch": 0}
    common.save_checkpoint(tmp_path / "best.pt", ck)
    model = common.load_model("nc-tiny", str(tmp_path / "best.pt"), torch.device("cpu"),
                              log=lambda line: None)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tuned.state_dict().values()))
    with pytest.raises(UserError, match="best.pt is a checkpoint of nc-tiny, not ViT-B-32"):
        common.load_model("ViT-B-32", str(tmp_path / "best.pt"), torch.device("cpu"))
    # weights of another model: one line that keeps the cause (the keys), not a bare
    # "Error(s) in loading state_dict"
    ck["model"] = {k: v for k, v in ck["model"].items() if k != "positional_embedding"}
    common.save_checkpoint(tmp_path / "cut.pt", ck)
    with pytest.raises(UserError, match="Missing key.*positional_embedding"):
        common.load_model("nc-tiny", str(tmp_path / "cut.pt"), torch.device("cpu"))


def test_a_checkpoint_keeps_the_architecture_of_the_weights_its_run_started_from(tmp_path):
    """OpenAI's ViT-B-32 uses QuickGELU: its fine-tuned checkpoint must be rebuilt with it
    (no download needed)."""
    a = {"method": "npc", "args": {"model": "ViT-B-32", "pretrained": "openai"}, "model": {}}
    common.save_checkpoint(tmp_path / "a.pt", a)
    b = {"method": "sdd", "args": {"model": "ViT-B-32", "pretrained": str(tmp_path / "a.pt")}, "model": {}}
    common.save_checkpoint(tmp_path / "b.pt", b)
    for name in ("a.pt", "b.pt"):  # b continued from a: the setting passes down the chain
        path, kwargs = common.resolve_weights("ViT-B-32", str(tmp_path / name))
        assert path == str(tmp_path / name) and kwargs["force_quick_gelu"] is True
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")  # open_clip's own files: no settings implied
    assert common.resolve_weights("ViT-B-32", str(tmp_path / "plain.pt")) == (str(tmp_path / "plain.pt"), {})
