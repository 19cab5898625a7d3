"""The two FLUX.1 tokenizers, giving the same ids as the transformers tokenizers `FluxPipeline` uses.

    T5Tokenizer(".../tokenizer_2", max_length=512)(prompts)   -> LongTensor (B, max_length)   (256 for schnell)
    CLIPTokenizer(".../tokenizer")(prompts)                  -> LongTensor (B, 77)

T5 (SentencePiece unigram, `tokenizer.json` or `spiece.model`): pieces + `</s>` (id 1), padded with `<pad>`
(id 0). The pieces, scores and normalization table are read from tokenizer.json (preferred, as transformers
does; see T5Tokenizer) or spiece.model and run through the same `tokenizers` pipeline transformers builds for
`T5TokenizerFast` (v5): the model's Precompiled (nmt_nfkc) normalizer, split on Unicode whitespace, "▁" before
every word, unigram Viterbi. Raw sentencepiece differs from it on rare inputs (the Precompiled normalizer
replaces a whole grapheme cluster by the mapping of its first character, so a space followed by a combining
mark loses the mark; it splits on U+0085/U+1680/U+2029 which sentencepiece keeps), and FLUX's ids are
transformers' ids. Special tokens written in a prompt (`</s>`, `<pad>`, `<unk>`, `<extra_id_N>`)
become their ids, as in transformers. The 100 `<extra_id_N>` sentinels follow the pieces, last first:
`<extra_id_0>` = pieces + 99 (32099 for T5).

CLIP (byte-level BPE, `vocab.json` + `merges.txt`): the pipeline of transformers' `CLIPTokenizer` rebuilt with
the `tokenizers` library (NFC, runs of whitespace -> one space, lower case; CLIP's word-splitting regex; BPE
with `</w>` word ends), then `<|startoftext|>` (49406) ... `<|endoftext|>` (49407), padded with 49407.

Longer prompts are truncated to max_length (keeping the final end token) with a `warnings.warn` saying how many
tokens were dropped. Both tokenizers take a str or a list of str; the empty prompt is allowed.
"""
from __future__ import annotations

import base64
import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import files


def _as_list(prompts: str | list[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        if not prompts:
            raise ValueError("tokenizer: got an empty list of prompts")
        return list(prompts)
    raise TypeError(f"tokenizer: expected a str or a list of str, got {type(prompts).__name__}")


def _finish(ids: list[int], max_length: int, end: int, what: str, index: int) -> list[int]:
    """Truncate `ids` (which end with the end token) to max_length keeping the end token; warn if anything goes."""
    if len(ids) > max_length:
        dropped = len(ids) - max_length
        warnings.warn(f"{what}: prompt {index} has {len(ids)} tokens; {dropped} token(s) past max_length="
                      f"{max_length} were dropped", stacklevel=3)
        ids = ids[:max_length - 1] + [end]
    return ids


def _batch(encode, prompts: str | list[str], max_length: int, end: int, pad: int, what: str) -> Tensor:
    """Encode every prompt, truncate (keeping the end token, with a warning) and pad to (B, max_length)."""
    rows = []
    for i, p in enumerate(_as_list(prompts)):
        ids = _finish(encode(p), max_length, end, what, i)
        rows.append(ids + [pad] * (max_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def _protobuf_field(buf: bytes, number: int) -> bytes | None:
    """The first length-delimited field `number` of a serialized protobuf message (enough to read one
    field of spiece.model without a protobuf dependency)."""
    i = 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n = varint()
            if field == number:
                return buf[i:i + n]
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return None


def _t5_pipeline(vocab: list[tuple[str, float]], charsmap: bytes | None, specials: list[str], unk_id: int):
    """The `tokenizers` pipeline transformers v5 builds for T5TokenizerFast (without its post-processor)."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


class T5Tokenizer:
    """T5 tokenizer from a `tokenizer_2/` folder, a `spiece.model` file or a `tokenizer.json` file.

    A folder is read through its `tokenizer.json` (the `tokenizers` file transformers saves) when it has one,
    else through `spiece.model`; `extra_ids` (default 100) comes from the `tokenizer_config.json` beside either.
    The real FLUX.1 folders ship both files with the same pieces, scores and normalization table, so either
    gives the same ids; tokenizer.json goes first because that is the file transformers (v4 and v5) reads when
    both exist, so if the two ever disagree our ids still are FluxPipeline's. From tokenizer.json only what
    transformers v5's `T5TokenizerFast` takes is used: the unigram pieces with their scores and the Precompiled
    charsmap of its normalizer (also when it sits in a Sequence). Its pre-tokenizer, other normalizers and
    post-processor are replaced by the same pipeline as for spiece.model, so `</s>` is appended exactly once
    (a HF tokenizer.json's post-processor appends it too; it is not used)."""

    pad_id, eos_id, unk_id = 0, 1, 2
    SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 in T5's layout

    def __init__(self, path: str | Path, max_length: int = 512):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"T5 tokenizer not found: {path}")
        if path.is_dir():
            for name in ("tokenizer.json", "spiece.model"):
                if os.path.lexists(path / name):  # a FIFO or folder by that name is refused, not skipped
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"T5 tokenizer: {path} has neither tokenizer.json nor spiece.model "
                                        "(a FLUX.1 tokenizer_2/ folder has both)")
        if max_length < 1:
            raise ValueError(f"T5 tokenizer: max_length must be >= 1, got {max_length}")
        extra_ids = 100
        config = path.parent / "tokenizer_config.json"
        if os.path.lexists(config):
            extra_ids = files.read_json(config, "T5 tokenizer config").get("extra_ids", 100)
            if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or not 0 <= extra_ids <= 1000:
                raise ValueError(f"{config}: extra_ids = {extra_ids!r} (T5 uses 100; at most 1000)")
        extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
        if path.suffix == ".json":
            vocab, charsmap = self._read_tokenizer_json(path)   # already holds the sentinels, last first
            specials = list(self.SPECIALS)
        else:
            vocab, charsmap, specials = self._read_spiece(path)
            vocab = vocab + [(t, 0.0) for t in reversed(extra)]
        self.tok = _t5_pipeline(vocab, charsmap, specials + extra, self.unk_id)
        self.max_length, self.vocab_size = max_length, self.tok.get_vocab_size(with_added_tokens=True)
        self.source = path

    @classmethod
    def _read_spiece(cls, model_file: Path) -> tuple[list[tuple[str, float]], bytes | None, list[str]]:
        """(pieces with scores, precompiled charsmap, [pad, eos, unk] pieces) of a SentencePiece model."""
        import sentencepiece as spm

        files.regular(model_file, "T5 tokenizer", files.LIMITS["tokenizer"])  # never hand sentencepiece a FIFO
        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"T5 tokenizer: cannot read {model_file} as a SentencePiece model ({e})") from None
        if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (cls.pad_id, cls.eos_id, cls.unk_id):
            raise ValueError(f"T5 tokenizer: {model_file} must have pad=0, eos=1, unk=2 (T5's layout), got "
                             f"pad={sp.pad_id()}, eos={sp.eos_id()}, unk={sp.unk_id()}")
        n = sp.get_piece_size()
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)]
        spec = _protobuf_field(sp.serialized_model_proto(), 3)  # ModelProto.normalizer_spec
        charsmap = _protobuf_field(spec, 2) if spec else None   # NormalizerSpec.precompiled_charsmap
        specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]  # pad eos unk
        return vocab, charsmap, specials

    @classmethod
    def _read_tokenizer_json(cls, file: Path) -> tuple[list[tuple[str, float]], bytes | None]:
        """(pieces with scores, precompiled charsmap) of a `tokenizers` tokenizer.json holding a T5 unigram."""
        from tokenizers import Tokenizer  # optional dependency: imported where it is needed

        text = files.read_text(file, "T5 tokenizer", files.LIMITS["json"])  # one guarded read, used twice
        try:
            Tokenizer.from_str(text)  # the library's own check that this is a tokenizer it can run
            data = json.loads(text)
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on malformed files)
            raise ValueError(f"T5 tokenizer: cannot read {file} as a tokenizers tokenizer.json ({e})") from None
        model = data.get("model") or {}
        if model.get("type", "Unigram") != "Unigram" or not isinstance(model.get("vocab"), list):
            raise ValueError(f"T5 tokenizer: {file} holds a {model.get('type')} model; T5 needs a Unigram one")
        vocab = [(str(piece), float(score)) for piece, score in model["vocab"]]
        if tuple(p for p, _ in vocab[:3]) != cls.SPECIALS or model.get("unk_id") != cls.unk_id:
            raise ValueError(f"T5 tokenizer: {file} must have <pad>, </s>, <unk> at ids 0, 1, 2 and unk_id=2 "
                             f"(T5's layout), got {[p for p, _ in vocab[:3]]} and unk_id={model.get('unk_id')}")
        norm = data.get("normalizer") or {}
        parts = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        charsmaps = [n["precompiled_charsmap"] for n in parts if n.get("type") == "Precompiled"]
        return vocab, base64.b64decode(charsmaps[0]) if charsmaps and charsmaps[0] else None

    def encode(self, text: str) -> list[int]:
        """Ids of one prompt followed by `</s>`, without truncation or padding."""
        return self.tok.encode(text, add_special_tokens=False).ids + [self.eos_id]

    def __call__(self, prompts: str | list[str]) -> Tensor:
        """(B, max_length) int64: ids + `</s>`, truncated (with a warning) or padded with 0."""
        return _batch(self.encode, prompts, self.max_length, self.eos_id, self.pad_id, "T5 tokenizer")


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer from a `tokenizer/` folder (vocab.json + merges.txt)."""

    bos_id, eos_id = 49406, 49407
    # CLIP's word splitting (the regex of OpenAI's tokenizer, as transformers writes it)
    PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, folder: str | Path, max_length: int = 77):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer folder not found: {folder}")
        for name in ("vocab.json", "merges.txt"):
            if not os.path.lexists(folder / name):
                raise FileNotFoundError(f"CLIP tokenizer: {folder / name} is missing")
        if max_length < 2:
            raise ValueError(f"CLIP tokenizer: max_length must be >= 2, got {max_length}")
        vocab = files.read_json(folder / "vocab.json", "CLIP tokenizer vocabulary")
        lines = files.read_text(folder / "merges.txt", "CLIP tokenizer merges").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bos, eos = "<|startoftext|>", "<|endoftext|>"
        if vocab.get(bos) != self.bos_id or vocab.get(eos) != self.eos_id:
            raise ValueError(f"CLIP tokenizer: {folder / 'vocab.json'} must map {bos} to {self.bos_id} and {eos} "
                             f"to {self.eos_id}, got {vocab.get(bos)} and {vocab.get(eos)}")
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=eos))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (bos, eos)])
        self.tok, self.max_length = tok, max_length
        self.vocab_size = len(vocab)

    def encode(self, text: str) -> list[int]:
        """BOS + ids + EOS of one prompt, without truncation or padding."""
        return [self.bos_id] + self.tok.encode(text, add_special_tokens=False).ids + [self.eos_id]

    def __call__(self, prompts: str | list[str]) -> Tensor:
        """(B, max_length) int64: BOS ids EOS, truncated (with a warning) or padded with EOS (49407)."""
        return _batch(self.encode, prompts, self.max_length, self.eos_id, self.eos_id, "CLIP tokenizer")
