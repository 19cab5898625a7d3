"""Tokenizers: the same ids as the transformers tokenizers diffusers' FluxPipeline uses, on varied prompts."""
import random
import warnings

import pytest
import torch
from conftest import CLIP_VOCAB

from minidit.tokenizer import CLIPTokenizer, T5Tokenizer
from minidit.weights.tiny_text import CORPUS, TINY_T5, write_t5_tokenizer

transformers = pytest.importorskip("transformers")

HANDWRITTEN = [
    "", " ", "   ", "\t\n", "a", "A photo of a cat wearing a red hat, 4k!", "A PHOTO OF A CAT", "a photo  of   a cat",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic space",
    "numbers 0123456789 and 3.14159, 1,000,000 and 12:30pm", "price: $19.99 / €25 / £12 / ¥500",
    "punctuation!!! ??? ... ;;; --- ___ *** ### @@@ %%% &&& ((( ))) [[[ ]]] {{{ }}}",
    "quotes 'single' \"double\" `back` «guillemets» „low“", "don't won't it's they're we've I'm you'll he'd",
    "DON'T STOP ME NOW", "email@example.com https://example.org/path?q=1&r=2#frag",
    "café crème brûlée naïve résumé façade Zürich São Paulo", "Ａｂｃ ｆｕｌｌｗｉｄｔｈ １２３", "ﬁ ﬂ ligatures",
    "e\u0301 (e + combining acute) vs é", "x \u0301 a space then a combining mark", "\u2000\u0301 start",
    "emoji 😀 🐱‍👤 👍🏽 ❤️ 🇫🇷 🎉🎉🎉", "😀", "😀😀😀", "日本語のテキスト", "中文提示词：一只猫", "한국어 문장",
    "Ελληνικά κείμενο", "Русский текст с КАПСОМ", "עברית", "العربية", "हिन्दी", "ไทย",
    "zero\u200bwidth\u200cnon\u200djoiner", "soft\u00adhyphen", "bom\ufeffinside", "nel\u0085char ogham\u1680space",
    "line\u2028sep para\u2029sep narrow\u202fnbsp math\u205fspace", "control \x00\x01\x07 chars",
    "</s> written eos", "<pad> and <unk> in text", "sentinel <extra_id_0> and <extra_id_99> and <extra_id_100>",
    "<|startoftext|> and <|endoftext|> in text", "<|STARTOFTEXT|> upper", "a<extra_id_5>b</s>c",
    "slashes/and\\backslashes|pipes", "math: 2+2=4, x^2, a<b>c, 50% off", "①②③ ¹²³ ½ ¼",
    "hyphen-ated words and under_scored_words and camelCaseWords", "ALLCAPS MiXeD cAsE",
    "a very long word: pneumonoultramicroscopicsilicovolcanoconiosis",
    "repeated " * 40,
    " ".join(CORPUS),  # far past both max lengths
]


def _generated(n=200, seed=0):
    """Random prompts from corpus words with random case, punctuation, unicode and whitespace."""
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    extras = list(",.;:!?'\"()[]-/&%$#@") + ["😀", "👍🏽", "é", "ß", "ñ", "中", "①", "\u0301", "\u200d", "'s", "'ll",
                                             "</s>", "<extra_id_3>", "<|endoftext|>"]
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", ""]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 25)):
            w = rng.choice(words) if rng.random() < 0.75 else rng.choice(extras)
            w = w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.1 else w
            parts.append(w + rng.choice(spaces))
        out.append("".join(parts))
    return out


PROMPTS = HANDWRITTEN + _generated()


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return write_t5_tokenizer(tmp_path_factory.mktemp("tokenizer_2"))


@pytest.fixture(scope="module")
def hf_t5(t5_folder):
    return transformers.T5TokenizerFast.from_pretrained(t5_folder)  # the class FluxPipeline's tokenizer_2 is


@pytest.fixture(scope="module")
def hf_clip():
    return transformers.CLIPTokenizer.from_pretrained(CLIP_VOCAB)  # the class FluxPipeline's tokenizer is


def _hf_ids(tok, prompts, max_length):
    # exactly the call in diffusers' FluxPipeline._get_t5_prompt_embeds / _get_clip_prompt_embeds
    return tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_length=False,
               return_overflowing_tokens=False, return_tensors="pt").input_ids


def test_enough_prompts():
    assert len(PROMPTS) >= 250


@pytest.mark.parametrize("max_length", [512, 256, 16])
def test_t5_ids_match_transformers(t5_folder, hf_t5, max_length):
    ours = T5Tokenizer(t5_folder, max_length)
    assert ours.vocab_size == len(hf_t5)
    assert TINY_T5.vocab_size >= ours.vocab_size  # the tiny T5 has an embedding for every id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    ref = _hf_ids(hf_t5, PROMPTS, max_length)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), max_length)
    bad = [p for p, a, b in zip(PROMPTS, got, ref) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_clip_ids_match_transformers(hf_clip):
    ours = CLIPTokenizer(CLIP_VOCAB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    ref = _hf_ids(hf_clip, PROMPTS, 77)
    assert got.shape == (len(PROMPTS), 77)
    bad = [p for p, a, b in zip(PROMPTS, got, ref) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_known_ids():
    # from clip_tokenizer/NOTE.md (checked there against OpenAI's reference tokenizer)
    ids = CLIPTokenizer(CLIP_VOCAB)("A photo of a cat wearing a red hat, 4k!")[0]
    expected = [49406, 320, 1125, 539, 320, 2368, 3309, 320, 736, 3801, 267, 275, 330, 256, 49407]
    assert ids[:15].tolist() == expected and (ids[15:] == 49407).all()


def test_empty_prompt(t5_folder):
    assert T5Tokenizer(t5_folder, 8)("").tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    assert CLIPTokenizer(CLIP_VOCAB)([""]).tolist() == [[49406] + [49407] * 76]


def test_special_ids(t5_folder, hf_t5):
    tok = T5Tokenizer(t5_folder, 8)
    ids = tok("<extra_id_0> <extra_id_99></s>")[0].tolist()
    assert ids[:4] == [tok.vocab_size - 1, tok.vocab_size - 100, 1, 1]
    assert ids[:2] == hf_t5.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"])


def test_truncation_warns_with_count(t5_folder, hf_t5, hf_clip):
    long = " ".join(CORPUS)
    n_t5 = len(hf_t5(long).input_ids)  # untruncated, with </s>
    with pytest.warns(UserWarning, match=rf"prompt 1 has {n_t5} tokens; {n_t5 - 256} token\(s\) past max_length=256"):
        ids = T5Tokenizer(t5_folder, 256)(["short", long])
    assert ids[1, -1] == 1 and (ids[1] == 0).sum() == 0  # truncated: ends with </s>, no pad
    assert (ids[0] == 1).sum() == 1 and ids[0, -1] == 0
    n_clip = len(hf_clip(long).input_ids)
    with pytest.warns(UserWarning, match=rf"{n_clip - 77} token\(s\) past max_length=77"):
        ids = CLIPTokenizer(CLIP_VOCAB)(long)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing is dropped
        T5Tokenizer(t5_folder, 256)("short")
        CLIPTokenizer(CLIP_VOCAB)("short")


def test_batch_equals_single(t5_folder):
    tok = T5Tokenizer(t5_folder, 64)
    batch = tok(PROMPTS[:20])
    assert all(torch.equal(batch[i], tok(p)[0]) for i, p in enumerate(PROMPTS[:20]))


def test_t5_tokenizer_deterministic(tmp_path, t5_folder):
    again = write_t5_tokenizer(tmp_path / "again")
    for f in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / f).read_bytes() == (t5_folder / f).read_bytes()


def test_errors(tmp_path, t5_folder):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        T5Tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer(tmp_path)
    with pytest.raises(TypeError, match="str or a list of str"):
        T5Tokenizer(t5_folder)(3)
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="SentencePiece"):
        T5Tokenizer(tmp_path / "bad.model")
