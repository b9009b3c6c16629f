"""The tokenizer's fast path for BERT's WordPiece gives exactly the ids of the Rust library."""

from __future__ import annotations

import random
import string

import pytest
from helpers import ROOT, SST2_DEV
from muxtiny import write_wordlevel_tokenizer

from muxserve.model.tokenizer import TextTokenizer

BERT_TOKENIZER = ROOT / "model_repository" / "sst2-bert" / "1" / "tokenizer.json"
EDGES = [
    "", "   ", "it 's a charming and often affecting journey . ", "Don't STOP-believing!!", "__init__ ~ `code` {x} | a^b",
    "A1b2C3 4.5e6 $100 50%", "\tTab\nnew\rline", "vertical\x0btab\x0cform feed", "del\x7fete", "nul\x00byte",
    "[CLS] starts", "a [sep] b", "[MASK]", "##ing", "x" * 150 + " after a long word", "unknownwordzzzq qqqxj", "café naïve 中文 text",
    "non\u00a0breaking\u2003spaces", "a" * 101, "emoji 🙂 here",
]


def corpus() -> list[str]:
    rng = random.Random(7)
    alphabet = string.printable + "é中\u00a0[]#"
    texts = EDGES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    if SST2_DEV.exists():
        texts += [line.rsplit("\t", 1)[0] for line in SST2_DEV.read_text().splitlines()[1:]]
    return texts


@pytest.mark.skipif(not BERT_TOKENIZER.exists(), reason="no bundled BERT tokenizer")
def test_fast_path_matches_the_library():
    tokenizer = TextTokenizer(BERT_TOKENIZER, max_length=10**6)
    library = tokenizer._tok
    texts = corpus()
    fast = [tokenizer._fast.ids(t) for t in texts]
    assert all(fast[i] is not None for i in range(2, 7))  # plain ASCII text takes the fast path
    assert fast[EDGES.index("[CLS] starts")] is None and fast[EDGES.index("café naïve 中文 text")] is None
    for text, ids in zip(texts, fast, strict=True):
        assert ids is None or ids == library.encode(text).ids, text
    # the same through encode, fast and library paths mixed in one call, and truncation
    assert tokenizer.encode(texts).ids == [e.ids for e in library.encode_batch(texts)]
    short = TextTokenizer(BERT_TOKENIZER, max_length=8)
    encoded = short.encode(["one two", "one two three four five six seven eight"])
    assert encoded.truncated == [False, True]
    assert len(encoded.ids[1]) == 8 and encoded.ids[1][-1] == short.sep_id


def test_other_tokenizers_use_the_library(tmp_path):
    tokenizer = TextTokenizer(write_wordlevel_tokenizer(tmp_path / "tokenizer.json"), max_length=32)
    assert tokenizer._fast is None
    assert tokenizer.encode(["hello world"]).ids == [tokenizer._tok.encode("hello world").ids]
