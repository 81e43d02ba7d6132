"""NLIP: the harmonized loss, the completion rule, concept retrieval, the decoder's masks, generation, and
nlip.py end to end."""
import json

import pytest
import torch
from conftest import run_script, stop_after_first_epoch

import captions
import common
import nlip


def _features(b=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1) for _ in range(2))


def test_larger_eps_makes_a_pair_settle_at_lower_similarity():
    """Train free features on the harmonized loss: the positive cosine a pair ends at falls as
    its eps rises."""
    eps = torch.tensor([0.0, 0.3, 0.6, 0.9]).repeat_interleave(4)  # 4 pairs at each noise probability
    img, txt = (torch.nn.Parameter(x) for x in _features(16, 16))
    opt = torch.optim.Adam([img, txt], lr=0.05)
    for _ in range(300):
        a, b = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
        loss = nlip.harmonized_loss(a, b, torch.tensor(10.0), eps, 1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pos = (torch.nn.functional.normalize(img, dim=-1) * torch.nn.functional.normalize(txt, dim=-1)).sum(1)
    by_eps = pos.reshape(4, 4).mean(1)  # mean positive cosine at eps 0, 0.3, 0.6, 0.9
    assert (by_eps.diff() < -0.02).all(), by_eps
    assert by_eps[0] > 0.8  # eps 0: pulled together as by InfoNCE


class _WordModel:
    """A stand-in CLIP whose text embedding of word i is row i of E (for concept retrieval)."""

    def __init__(self, E):
        self.E = E

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.normalize(self.E[tokens], dim=-1)


def test_top_concepts_are_the_nearest_concept_words():
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, 30)]
    concept_ids = list(range(6, 30))  # words 4 and 5 are not concepts
    E = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    img[0] = torch.nn.functional.normalize(E[4] + 0.01, dim=-1)  # nearest to a non-concept word: never chosen
    tokenizer = lambda words: torch.tensor([int(w[1:]) for w in words])
    got = nlip.top_concepts(_WordModel(E), img, concept_ids, tokenizer([vocab[c] for c in concept_ids]), 3)
    assert got.shape == (5, 3)
    sims = img @ torch.nn.functional.normalize(E, dim=-1).T
    for i in range(5):
        ranked = sorted(concept_ids, key=lambda c: -sims[i, c].item())
        assert got[i].tolist() == ranked[:3]


def _tiny_nlip(vocab_size=20):
    torch.manual_seed(0)
    clip, _, _ = common.load_model("nc-tiny", "none", torch.device("cpu"), log=lambda line: None)
    return nlip.NLIP(clip, nlip.Captioner(vocab_size, 128, 2, 128, 3 + 8 + 2)).eval()


def test_lm_inputs_leave_the_prompt_and_padding_out_of_the_loss():
    concepts = torch.tensor([[7, 8, 9], [10, 11, 12]])
    words = torch.tensor([[5, 6, captions.EOS, captions.PAD], [13, captions.EOS, captions.PAD, captions.PAD]])
    dec_in, target = captions.lm_inputs(concepts, words)
    assert dec_in.tolist() == [[7, 8, 9, captions.BOS, 5, 6, captions.EOS],
                               [10, 11, 12, captions.BOS, 13, captions.EOS, captions.PAD]]
    assert target.tolist() == [[-100, -100, -100, 5, 6, captions.EOS, -100],
                               [-100, -100, -100, 13, captions.EOS, -100, -100]]
    # L_LM of the model is the mean cross-entropy over exactly those positions
    model, images = _tiny_nlip(), torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 1000, (2, 32))
    with torch.no_grad():
        lm = model(images, tokens, dec_in, target)[3]
        logits = model.captioner(dec_in, model.patches(images)[1])
    for b, (first, last) in enumerate([(3, 6), (3, 5)]):
        want = torch.nn.functional.cross_entropy(logits[b, first:last], target[b, first:last])
        assert lm[b].item() == pytest.approx(want.item(), rel=1e-5)


def test_no_image_token_reaches_the_contrastive_text_features_and_the_decoder_is_causal():
    model = _tiny_nlip()
    tokens, dec_in = torch.randint(1, 1000, (2, 32)), torch.randint(4, 20, (2, 10))
    target = torch.full_like(dec_in, -100)
    with torch.no_grad():
        img_a, txt_a, _, _ = model(torch.randn(2, 3, 64, 64), tokens, dec_in, target)
        img_b, txt_b, _, _ = model(torch.randn(2, 3, 64, 64), tokens, dec_in, target)
        assert torch.equal(txt_a, txt_b) and not torch.allclose(img_a, img_b)
        patches = model.patches(torch.randn(2, 3, 64, 64))[1]
        before = model.captioner(dec_in, patches)
        changed = dec_in.clone()
        changed[:, 6] = 4
        after = model.captioner(changed, patches)
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-6)  # position j sees words up to j only
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_generation_writes_learnt_captions_greedy_and_by_beam():
    """A decoder taught two captions, one per image, writes each back from its image and prompt; greedy
    decoding is the argmax path step by step."""
    torch.manual_seed(0)
    captioner = nlip.Captioner(20, 32, 1, 8, 2 + 8 + 2)
    patches = torch.randn(2, 4, 8)
    concepts = torch.tensor([[4, 5], [6, 7]])
    words = torch.tensor([[10, 11, 12, captions.EOS], [13, 14, captions.EOS, captions.PAD]])
    dec_in, target = captions.lm_inputs(concepts, words)
    opt = torch.optim.Adam(captioner.parameters(), lr=3e-3)
    for _ in range(300):
        logits = captioner(dec_in, patches).transpose(1, 2)
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    captioner.eval()
    for beam in (1, 3):
        got = captions.generate(captioner, patches, concepts, 8, beam)
        assert captions.decode(got.tolist(), [f"w{i}" for i in range(20)]) == ["w10 w11 w12", "w13 w14"]
    g = torch.Generator().manual_seed(1)
    # an untrained decoder: greedy is still the argmax path
    rand = nlip.Captioner(20, 32, 1, 8, 2 + 8 + 2).eval()
    p, c = torch.randn(3, 4, 8, generator=g), torch.randint(4, 20, (3, 2), generator=g)
    seq = torch.cat([c, torch.full((3, 1), captions.BOS)], 1)
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, rand(seq, p)[:, -1].argmax(-1, keepdim=True)], 1)
    got = captions.generate(rand, p, c, 5, 1)
    for b in range(3):
        n = next((j + 1 for j, w in enumerate(seq[b, 3:].tolist()) if w in (captions.EOS, captions.PAD)), 5)
        assert got[b, :n].tolist() == seq[b, 3:3 + n].tolist()


def test_nlip_runs_end_to_end_completes_captions_and_resumes(embedded, tmp_path):
    # from the tiny pre-trained CLIP, as bench.py runs NLIP
    # (from scratch, 240 images leave eps at chance: AUC 0.50)
    argv = ["--data-root", embedded, "--batch-size", "48", "--warmup", "5", "--min-count", "2",
            "--warmup-epochs", "1", "--epochs", "3", "--pretrained", embedded / "nc-tiny-pretrained.pt",
            "--lr", "5e-4"]
    stop_after_first_epoch("nlip.py", tmp_path, *argv)  # the plain warm-up epoch
    p = run_script("nlip.py", *argv, "--out-dir", tmp_path, "--resume")
    assert p.returncode == 0, p.stderr
    assert "epoch 2 scan: eps AUC" in p.stdout and "(used)" in p.stdout and "generated '" in p.stdout
    assert "resumed from" in p.stdout and "epoch 3/3" in p.stdout and "epoch 1/" not in p.stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2, 3]
    assert r["history"][1]["completed"] == 0 and r["history"][2]["completed"] > 0  # warm-up, then completion
    # eps separates the noisy pairs (measured 0.87-0.90), and completion lands on them
    for h in r["history"][1:]:
        assert h["eps_auc"] > 0.75
        # noise rate 0.40; measured 0.78-0.82
        assert h["epoch"] == 1 or h["completed_noisy"] > 0.6 * h["completed"]
    assert 0 <= r["captioning"]["bleu4"] <= 1 and r["captioning"]["cider"] >= 0
    assert set(r["zero_shot"]) == {"shape", "colour", "colour shape"} and r["test"]["rsum"] > 0


@pytest.mark.parametrize(("flag", "value", "words"),
                         [("--lam", "1.5", "--lam must be in [0, 1], got 1.5"),
                          ("--synthetic-lam", "-0.1", "--synthetic-lam must be in [0, 1], got -0.1"),
                          ("--beam", "0", "--beam must be >= 1, got 0")])
def test_bad_nlip_flags_give_one_line_error(flag, value, words, embedded, tmp_path):
    p = run_script("nlip.py", "--data-root", embedded, "--out-dir", tmp_path, flag, value)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {words}"
