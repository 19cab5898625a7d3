"""Tiny text-encoder checkpoints and tokenizers in the official FLUX folder layouts, for tests and the demo.

    write_tiny_t5(folder)          -> text_encoder_2/: config.json + model-0000N-of-0000M.safetensors + index
    write_tiny_clip(folder)        -> text_encoder/:   config.json + model.safetensors
    write_t5_tokenizer(folder)     -> tokenizer_2/:    spiece.model + tokenizer_config.json + special_tokens_map.json
    write_clip_tokenizer(folder)   -> tokenizer/:      vocab.json + merges.txt + tokenizer_config.json (+ NOTE.md)

The weights are random (seeded) and the key names, config fields and file names are those of the real
`black-forest-labs/FLUX.1-dev` folders, so both minidit and transformers read them. The T5 tokenizer is a small
SentencePiece unigram model trained here, deterministically, on the corpus below with T5 v1.1's special ids
(pad 0, eos 1, unk 2, no bos) and 100 `<extra_id_N>` sentinels appended after the pieces, last one first, as
the real 32,000-piece `spiece.model` + `extra_ids=100` do. The CLIP tokenizer is the real CLIP vocabulary
(see `clip_tokenizer/NOTE.md`). Package code: no transformers import here.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidit.clip import CLIPTextConfig
from minidit.t5 import T5Config, relative_position_bucket

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
T5_EXTRA_IDS = 100
T5_SPIECE_SIZE = 400  # pieces in the tiny spiece.model; the tokenizer has 400 + 100 sentinels = 500 ids

# Small T5 / CLIP shapes: fast on CPU, but with several heads and layers so the parity tests mean something.
TINY_T5 = T5Config(vocab_size=512, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2,
                   num_buckets=32, max_distance=128, eps=1e-6)
TINY_CLIP = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           max_positions=77, eps=1e-5, hidden_act="quick_gelu", eos_token_id=2)

# Training text for the tiny SentencePiece model: image-prompt-like English with digits, punctuation and a few
# accented letters. Anything outside it (emoji, CJK, ...) tokenizes to <unk>, as rare characters do in real T5.
CORPUS = """\
a photo of a cat wearing a red hat, 4k, highly detailed
a dog sitting on a wooden bench in a park at sunset
portrait of an old man with a grey beard, studio lighting, 85mm lens
a bowl of fresh fruit on a kitchen table: apples, oranges and grapes
an astronaut riding a horse on the moon, digital art
the city skyline at night with neon lights reflecting in the rain
a watercolor painting of a small house by the lake
close-up of a flower with drops of water on its petals
a futuristic car driving through a desert highway
two children playing with a ball on the beach
a mountain landscape covered in snow under a blue sky
a cup of coffee next to an open book on a desk
an illustration of a dragon flying over a medieval castle
a black and white photograph of a busy street in 1950
a robot holding a sign that says "hello world"
a plate of pasta with tomato sauce and basil leaves
a girl with long hair reading a letter by the window
a tiny frog sitting on a green leaf after the rain
a sailing boat on the ocean during a storm, dramatic waves
a cozy living room with a fireplace, warm light, 35mm film
a bicycle leaning against a brick wall covered with ivy
a teddy bear wearing sunglasses at the swimming pool
an oil painting of a village in the mountains, autumn colors
the logo of a coffee shop, minimal, vector, flat design
a man in a suit walking his dog in the snow
a macro shot of an insect on a branch, shallow depth of field
a bridge over a river with trees on both sides
a bird sitting on a power line against the evening sky
three red apples and one green pear on a white plate
a knight in shining armor standing in front of a gate
a woman smiling, soft focus, golden hour, 50mm
a train crossing a bridge in the countryside
a stack of pancakes with syrup and berries, food photography
an abstract pattern of circles and lines in blue and orange
a lighthouse on a rocky cliff at dawn
the interior of a library with tall wooden shelves
a cat and a dog sleeping together on a sofa
a street market in the morning with colorful fruit stands
a snowy forest with a small cabin and smoke from the chimney
a vintage poster of a travel destination, 1920s style
a glass of orange juice on a table in the garden
a group of friends laughing around a campfire at night
a samurai with a sword under cherry blossoms
a red sports car parked in front of a modern building
an aerial view of a city with many roads and buildings
a panda eating bamboo in the forest
a wizard casting a spell with a glowing staff
a cake with candles for a birthday party, number 30
a pixel art scene of a castle and a lake
a sculpture of a horse made of metal, museum lighting
a café in Paris with people sitting outside, café au lait
a piñata at a children's party in México
the Zürich lake with swans, crème brûlée on the side
an elephant walking across the savanna at sunset
a jar of cookies on a shelf, warm and cozy
a spaceship landing on an alien planet with two moons
a violin on a chair in an empty concert hall
a man playing guitar on the street, people listening
a close-up portrait of a tiger, intense eyes
a pair of shoes on a wooden floor, product photo
a hot air balloon floating over green hills
a fisherman on a boat in the fog, early morning
a map of an imaginary island with mountains and rivers
the word "minidit" written in large letters on a wall
a small robot watering plants in a greenhouse
a rainy window with blurred city lights behind it
a chess board with pieces in the middle of a game
a steaming bowl of ramen with egg and green onions
a fox running through a field of tall grass
a photo taken with a phone, 12 megapixels, f/1.8, ISO 100
a poster that says: SALE 50% OFF! only today, 9:00-17:00
a list of items: milk, eggs, bread, butter & cheese
what is the answer? 42. why? because (it is) [obvious]!
email me at hello@example.com or visit www.example.org/page?id=7
price: $19.99, €25, £12; temperature 23.5 degrees; 3 x 4 = 12
an old key on a velvet cloth, dark background
a penguin walking on ice, cartoon style
a family having dinner at a long table outdoors
a kitten playing with a ball of wool
the northern lights over a frozen lake, long exposure
a skyscraper made of glass reflecting the clouds
a child drawing with crayons on paper
a wooden boat tied to a dock in a calm harbor
a garden full of sunflowers and butterflies
""".splitlines()


def write_tiny_t5(folder: str | Path, cfg: T5Config | None = None, seed: int = 0, shards: int = 2,
                  sd: dict[str, torch.Tensor] | None = None) -> Path:
    """A random T5 encoder in the `text_encoder_2/` layout: config.json, `shards` safetensors files and
    model.safetensors.index.json (keys as `T5EncoderModel`, fp32). `sd`: trained weights (those keys) to write
    instead of random ones. Returns the folder."""
    cfg = cfg or TINY_T5
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if sd is None:
        sd = _random_t5(cfg, seed)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    _write_sharded(folder, sd, shards)
    return folder


def _random_t5(cfg: T5Config, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    sd = {"shared.weight": randn(cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        for name in "qkvo":
            sd[p + f"0.SelfAttention.{name}.weight"] = randn(d, inner, std=d ** -0.5) if name == "o" \
                else randn(inner, d, std=d ** -0.5)
        if i == 0:
            sd[p + "0.SelfAttention.relative_attention_bias.weight"] = randn(cfg.num_buckets, cfg.num_heads)
        sd[p + "0.layer_norm.weight"] = 1.0 + randn(d, std=0.1)
        sd[p + "1.DenseReluDense.wi_0.weight"] = randn(cfg.d_ff, d, std=d ** -0.5)
        sd[p + "1.DenseReluDense.wi_1.weight"] = randn(cfg.d_ff, d, std=d ** -0.5)
        sd[p + "1.DenseReluDense.wo.weight"] = randn(d, cfg.d_ff, std=cfg.d_ff ** -0.5)
        sd[p + "1.layer_norm.weight"] = 1.0 + randn(d, std=0.1)
    sd["encoder.final_layer_norm.weight"] = 1.0 + randn(d, std=0.1)
    return sd


LOCAL_OFFSETS = (1, 2, -1, -2)   # one head per offset: the next two and the previous two tokens


def local_position_bias(cfg: T5Config, offsets=LOCAL_OFFSETS, strength: float = 8.0) -> torch.Tensor:
    """A designed `relative_attention_bias` (num_buckets, num_heads): head h adds `strength` to the logits of
    the key at `offsets[h]` from the query (0 elsewhere), so each of a frozen random T5's heads attends mostly to
    one neighbour and every token's output carries its neighbours' identity ("blue" before "background" differs
    from "blue" before "circle"). A pretrained T5 learns such context; a random position bias (N(0, 1) per bucket)
    mixes all tokens nearly evenly, so the DiT sees close to a bag of words. Heads beyond len(offsets): zeros."""
    bias = torch.zeros(cfg.num_buckets, cfg.num_heads)
    for h, off in enumerate(offsets[:cfg.num_heads]):
        bias[int(relative_position_bucket(torch.tensor(off), cfg.num_buckets, cfg.max_distance)), h] = strength
    return bias


def _write_sharded(folder: Path, sd: dict[str, torch.Tensor], shards: int) -> None:
    """Split `sd` (in key order) into `shards` files named like transformers' sharded checkpoints."""
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    keys = list(sd)
    shards = max(1, min(shards, len(keys)))
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s * len(keys) // shards:(s + 1) * len(keys) // shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tiny_clip(folder: str | Path, cfg: CLIPTextConfig | None = None, seed: int = 0,
                    sd: dict[str, torch.Tensor] | None = None) -> Path:
    """A random CLIP text encoder in the `text_encoder/` layout (config.json + model.safetensors, keys with
    the `text_model.` prefix as in FLUX.1's file, fp32). `sd`: trained weights (those keys) to write instead of
    random ones. Returns the folder."""
    cfg = cfg or TINY_CLIP
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if sd is None:
        sd = _random_clip(cfg, seed)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def _random_clip(cfg: CLIPTextConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    d, f = cfg.hidden_size, cfg.intermediate_size
    sd = {"text_model.embeddings.token_embedding.weight": randn(cfg.vocab_size, d, std=0.5),
          "text_model.embeddings.position_embedding.weight": randn(cfg.max_positions, d, std=0.5)}
    for i in range(cfg.num_layers):
        p = f"text_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{name}.weight"] = randn(d, d, std=d ** -0.5)
            sd[p + f"self_attn.{name}.bias"] = randn(d, std=0.1)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + f"{ln}.weight"] = 1.0 + randn(d, std=0.1)
            sd[p + f"{ln}.bias"] = randn(d, std=0.1)
        sd[p + "mlp.fc1.weight"] = randn(f, d, std=d ** -0.5)
        sd[p + "mlp.fc1.bias"] = randn(f, std=0.1)
        sd[p + "mlp.fc2.weight"] = randn(d, f, std=f ** -0.5)
        sd[p + "mlp.fc2.bias"] = randn(d, std=0.1)
    sd["text_model.final_layer_norm.weight"] = 1.0 + randn(d, std=0.1)
    sd["text_model.final_layer_norm.bias"] = randn(d, std=0.1)
    return sd


def write_t5_tokenizer(folder: str | Path, vocab_size: int = T5_SPIECE_SIZE, model_max_length: int = 512,
                       corpus: list[str] = CORPUS) -> Path:
    """Train a tiny SentencePiece unigram model on `corpus` (lines; default CORPUS; deterministic: one thread, no sampling) and write
    the `tokenizer_2/` files: spiece.model, tokenizer_config.json, special_tokens_map.json.

    `vocab_size` is the number of pieces in spiece.model (the real one has 32,000); the tokenizer adds 100
    `<extra_id_N>` sentinels after them (`<extra_id_0>` = vocab_size + 99), so a T5 reading its ids needs
    `vocab_size + 100` embeddings at least. Returns the folder."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, logstream=quiet,
            model_type="unigram", vocab_size=vocab_size, character_coverage=1.0,
            normalization_rule_name="nmt_nfkc", num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, hard_vocab_limit=True, byte_fallback=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        )
    (folder / "spiece.model").write_bytes(model.getvalue())

    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    special = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
               "special": True}
    added = {str(i): {**special, "content": t} for i, t in enumerate(["<pad>", "</s>", "<unk>"])}
    added.update({str(vocab_size + T5_EXTRA_IDS - 1 - i): {**special, "content": t} for i, t in enumerate(extra)})
    config = {
        "add_prefix_space": True, "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": extra, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS, "legacy": True, "model_max_length": model_max_length, "pad_token": "<pad>",
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return folder


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Copy the real CLIP-L vocabulary (vocab.json, merges.txt, tokenizer_config.json, NOTE.md with its MIT
    notice) into `folder` (the `tokenizer/` layout). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "NOTE.md"):
        shutil.copyfile(CLIP_TOKENIZER_DIR / name, folder / name)
    return folder

