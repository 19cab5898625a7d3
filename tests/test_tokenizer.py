"""Tokenizers: the same ids as the transformers tokenizers diffusers' FluxPipeline uses, on varied prompts."""
import json
import random
import shutil
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
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
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


# ------------------------------------------------------------------ T5 from tokenizer.json (what transformers saves)

@pytest.fixture(scope="module")
def t5_json_folder(tmp_path_factory, hf_t5):
    """A tokenizer_2/ folder with tokenizer.json (+ tokenizer_config.json) and no spiece.model, as transformers
    writes it (the real FLUX.1 folders ship this tokenizer.json next to spiece.model)."""
    folder = tmp_path_factory.mktemp("tokenizer_2_json")
    hf_t5.save_pretrained(folder)
    (folder / "spiece.model").unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").exists()
    return folder


def _long_warning(caught, n):
    return [str(w.message) for w in caught if f"has {n} tokens;" in str(w.message)]


@pytest.mark.parametrize("max_length", [512, 256])
def test_t5_json_ids_match_transformers(t5_folder, t5_json_folder, hf_t5, max_length):
    ours = T5Tokenizer(t5_json_folder, max_length)
    assert ours.source.name == "tokenizer.json" and ours.vocab_size == len(hf_t5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours(PROMPTS)
    # the oracle reads the same folder (transformers takes tokenizer.json when there is no spiece.model)
    hf_json = transformers.T5TokenizerFast.from_pretrained(t5_json_folder)
    ref = _hf_ids(hf_json, PROMPTS, max_length)
    assert got.shape == (len(PROMPTS), max_length)
    bad = [p for p, a, b in zip(PROMPTS, got, ref) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"
    assert torch.equal(ref, _hf_ids(hf_t5, PROMPTS, max_length))  # same ids as from spiece.model in transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(got, T5Tokenizer(t5_folder, max_length)(PROMPTS))  # and in minidit
    # one </s> (the file's post-processor appends one too), then padding
    assert got[PROMPTS.index("")].tolist() == [1] + [0] * (max_length - 1)
    assert got[PROMPTS.index("a")].tolist()[:3] == hf_json("a").input_ids + [0] and len(hf_json("a").input_ids) == 2
    long = " ".join(CORPUS)
    n = len(hf_json(long).input_ids)
    assert n > max_length and _long_warning(caught, n) == [
        f"T5 tokenizer: prompt {PROMPTS.index(long)} has {n} tokens; {n - max_length} token(s) past "
        f"max_length={max_length} were dropped"]
    assert got[PROMPTS.index(long), -1] == 1


def test_t5_json_file_path(t5_folder, t5_json_folder):
    by_file = T5Tokenizer(t5_json_folder / "tokenizer.json", 64)
    assert by_file.source == t5_json_folder / "tokenizer.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(by_file(PROMPTS), T5Tokenizer(t5_folder, 64)(PROMPTS))
    assert by_file("<extra_id_0></s>")[0, :3].tolist() == [by_file.vocab_size - 1, 1, 1]


def test_t5_prefers_tokenizer_json_as_transformers_does(tmp_path, t5_folder):
    """Both files present but disagreeing (a 300-piece tokenizer.json, the 400-piece spiece.model): transformers
    reads tokenizer.json, so we do too."""
    small = write_t5_tokenizer(tmp_path / "small", vocab_size=300)
    both = tmp_path / "both"
    transformers.T5TokenizerFast.from_pretrained(small).save_pretrained(both)
    shutil.copyfile(t5_folder / "spiece.model", both / "spiece.model")
    hf = transformers.T5TokenizerFast.from_pretrained(both)
    ours = T5Tokenizer(both, 128)
    assert ours.source.name == "tokenizer.json" and ours.vocab_size == len(hf) == 400
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
        assert not torch.equal(got, T5Tokenizer(t5_folder, 128)(PROMPTS))  # the two files really disagree
    assert torch.equal(got, _hf_ids(hf, PROMPTS, 128))


def test_t5_json_older_layout(tmp_path, t5_json_folder):
    """tokenizer.json as older transformers wrote it (legacy Metaspace, Precompiled inside a Sequence with
    Strip/Replace, no post-processor, no model type): transformers v5 keeps only the pieces and the charsmap."""
    data = json.loads((t5_json_folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        data["normalizer"], {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}]}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}]}
    data["post_processor"] = None
    del data["model"]["type"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copyfile(t5_json_folder / "tokenizer_config.json", old / "tokenizer_config.json")
    hf = transformers.T5TokenizerFast.from_pretrained(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = T5Tokenizer(old, 256)(PROMPTS)
        assert torch.equal(got, T5Tokenizer(t5_json_folder, 256)(PROMPTS))
    assert torch.equal(got, _hf_ids(hf, PROMPTS, 256))


def test_t5_json_errors(tmp_path, t5_json_folder):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read .*tokenizer.json as a tokenizers tokenizer.json"):
        T5Tokenizer(tmp_path)
    Tokenizer(BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="BPE model; T5 needs a Unigram one"):
        T5Tokenizer(tmp_path / "tokenizer.json")
    data = json.loads((t5_json_folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["vocab"][:2] = data["model"]["vocab"][1::-1]  # </s> and <pad> swapped
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="<pad>, </s>, <unk> at ids 0, 1, 2"):
        T5Tokenizer(tmp_path)
