"""BLEU-4 and CIDEr-D against values from pycocoevalcap, and properties that hold whatever the
implementation."""
import pytest

import captions
from captions import bleu4, cider, tokenize

REFS = [
    ["A man is riding a horse on the beach.", "A person rides a brown horse along the shore.",
     "Man on horseback at the beach."],
    ["Two dogs play with a red ball in the grass.", "A pair of dogs chasing a ball on a lawn.",
     "Two brown dogs are playing in a field.", "Dogs running after a red ball."],
    ["A plate of food with broccoli and rice.", "A white plate topped with rice, broccoli and chicken."],
    ["A red double decker bus driving down a city street.", "A bus is driving down the street in the city.",
     "A large red bus on a busy street.", "A double-decker bus on the road.",
     "The red bus is parked near the sidewalk."],
    ["A kitchen with wooden cabinets and a stove.", "A small kitchen has a white refrigerator.",
     "Kitchen area with an oven and cabinets."],
]
# exact match, partial and shorter, unrelated but sharing "a"/"of", long, unrelated and short
CANDS = [
    "A man is riding a horse on the beach.",
    "Two dogs playing with a ball",
    "A cat sleeping on top of a laptop keyboard",
    "A red bus driving down a street in a big busy city with many people walking",
    "Zebras grazing",
]
# shorter in total than the references, so the brevity penalty acts: image 2's closest reference (9 words)
# is not its shortest (8), image 3 (7 words) ties between references of 6 and 8; "dogs dogs" exercises
# CIDEr's clipping
SHORT = ["A horse on the beach", "Dogs dogs with a ball", "A white plate with chicken and rice on it",
         "A red bus driving down the street", "A white kitchen"]

# Produced by pycocoevalcap (github.com/salaniz/pycocoevalcap,
# commit ad63453cfab57a81a02b2949b17a91fab1c3df77): Bleu(4) score[3] and Cider() mean score, on these inputs
# joined back after tokenize(). Subsets matter for CIDEr, whose idf is taken over the scored set.
KNOWN = {
    "all": (CANDS, [0, 1, 2, 3, 4], 0.3796195348531243, 1.2684800095484436),
    "images-1-3": (CANDS, [1, 3], 0.21834177213073613, 1.0886444711937577),
    "images-0-3": (CANDS, [0, 1, 2, 3], 0.38691955827869506, 1.5796179115784525),
    "short": (SHORT, [0, 1, 2, 3, 4], 0.3922627586871718, 1.6864837130557966),
}


@pytest.mark.parametrize("name", KNOWN)
def test_matches_pycocoevalcap(name):
    cands, images, bleu_ref, cider_ref = KNOWN[name]
    cands, refs = [cands[i] for i in images], [REFS[i] for i in images]
    assert bleu4(cands, refs) == pytest.approx(bleu_ref, abs=1e-9)
    assert cider(cands, refs) == pytest.approx(cider_ref, abs=1e-9)


def test_tokenize():
    assert tokenize("A Man, riding  a horse.\n") == ["a", "man", "riding", "a", "horse"]


def test_identical_candidate_scores_bleu_one():
    refs = [["a man rides a horse on the beach"] * 3, ["two dogs chase a red ball"] * 2]
    assert bleu4([r[0] for r in refs], refs) == pytest.approx(1.0, abs=1e-6)


def test_shuffled_word_order_lowers_bleu():
    cands = ["a red bus driving down a city street", "two dogs play with a red ball"]
    shuffled = ["street city a down driving bus red a", "ball red a with play dogs two"]
    refs = [[REFS[3][0], REFS[3][1]], [REFS[1][0], REFS[1][3]]]
    assert bleu4(shuffled, refs) < bleu4(cands, refs) - 0.3
    # same words, same lengths: the unigram part of CIDEr is unchanged, only the 2-4-gram parts drop
    assert cider(shuffled, refs) < cider(cands, refs)


def test_unrelated_candidate_cider_zero():
    refs = [REFS[0], REFS[4]]
    assert cider(["zebras grazing", "zebras grazing"], refs) == 0.0
    assert cider([REFS[0][0], "zebras grazing"], refs) > 1  # the same scorer does score a match


def test_ngram_in_every_image_weighs_zero():
    # idf = log(images / images containing it) = 0 for an n-gram all images' references share
    refs = [["a photo of a dog", "a photo of a puppy"], ["a photo of a cat"], ["a photo of a bird"]]
    assert cider(["a photo of a", "a photo of a", "a photo of a"], refs) == 0.0
    assert cider(["a photo of a dog", "a photo of a cat", "a photo of a bird"], refs) > 0


def test_words_round_trip_through_the_vocabulary():
    vocab = captions.vocabulary(["A red disc.", "a red box", "A blue box"], min_count=2)
    assert vocab[4:] == ["a", "box", "red"]
    ids = captions.encode(["a red disc", "a box a box a box"], vocab, 4)
    # unknown word; cut to 3 words
    assert ids.tolist() == [[4, 6, captions.UNK, captions.EOS], [4, 5, 4, captions.EOS]]
    assert captions.decode(ids.tolist(), vocab) == ["a red", "a box a"]
