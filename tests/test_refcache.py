"""ReferenceCache (issue 27, item 4): a reference branch computed once and read by later prompts gives the same
bits as computing it for every image; a step that did not fit the limit is recomputed, exactly; a different
input is a different entry; the own-pass images equal the one-batch entry points up to float rounding."""
import pytest
import torch

from minidit.masks import Reference
from minidit.pipeline import Pipeline
from minidit.refcache import ReferenceCache, fingerprint, nbytes
from minidit.weights.tiny import write_tiny_repo

H, W = 96, 128                 # 6 x 8 tokens
PROMPTS = ["a toy on a table", "a toy in the snow, at night", "a toy"]
BOX = (32, 16, 64, 48)
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.load(write_tiny_repo(tmp_path_factory.mktemp("refcache") / "FLUX.1-dev", "dev", seed=5),
                         device="cpu")


def picture(seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, H // 16, W // 16, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low[None], size=(H, W), mode="bilinear")[0]


def run(pipe, method, ref, prompt, cache, seed=1, **kw):
    return getattr(pipe, method)(prompt, ref, steps=STEPS, seed=seed, cache=cache, return_latents=True, **kw)


@pytest.mark.parametrize("method, preset", [("personalize", "paper"), ("personalize", "official"),
                                            ("freecus", "paper")])
def test_shared_equals_computed_for_every_image(pipe, method, preset):
    ref = Reference(picture(1), BOX, "a toy" if method == "freecus" else None)  # FreeCus: its own reference prompt
    kw = dict(preset=preset) if method == "personalize" else dict(preset=preset, caption="red paint")
    alone = [run(pipe, method, ref, p, ReferenceCache(0), **kw) for p in PROMPTS]
    cache = ReferenceCache()
    shared = [run(pipe, method, ref, p, cache, **kw) for p in PROMPTS]
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)
    (entry,) = cache.entries.values()
    read = cache.hits
    assert read == (len(PROMPTS) - 1) * len(entry.rows) > 0         # every later prompt read every kept step
    assert not torch.equal(shared[0], shared[1])                          # the prompts matter (so could a mix-up)
    # another seed is another reference branch (its noise): a new entry, nothing read from the first
    other = run(pipe, method, ref, PROMPTS[0], cache, seed=2, **kw)
    assert len(cache.entries) == 2 and cache.hits == read
    assert torch.equal(other, run(pipe, method, ref, PROMPTS[0], ReferenceCache(0), seed=2, **kw))


def test_freecus_with_the_authors_reference_prompt_shares_nothing(pipe):
    """The authors run the reference with the target's full prompt: every prompt is its own entry."""
    ref = Reference(picture(2), BOX)
    cache = ReferenceCache()
    for p in PROMPTS[:2]:
        run(pipe, "freecus", ref, p, cache)
    assert len(cache.entries) == 2 and cache.hits == 0


def test_a_different_mask_is_a_different_entry(pipe):
    cache = ReferenceCache()
    run(pipe, "personalize", Reference(picture(3), BOX), PROMPTS[0], cache)
    out = run(pipe, "personalize", Reference(picture(3), (48, 16, 64, 48)), PROMPTS[1], cache)
    assert len(cache.entries) == 2 and cache.hits == 0
    assert torch.equal(out, run(pipe, "personalize", Reference(picture(3), (48, 16, 64, 48)), PROMPTS[1],
                                ReferenceCache(0)))


def test_past_the_limit_steps_are_recomputed_exactly(pipe):
    ref = Reference(picture(4), BOX)
    full = ReferenceCache()
    run(pipe, "personalize", ref, PROMPTS[0], full)
    (entry,) = full.entries.values()
    per_step = [nbytes(entry.rows[i]) for i in sorted(entry.rows)]
    assert len(per_step) == STEPS                                  # paper: replacement, then concatenation
    limit = sum(per_step[:2]) + nbytes(list(entry.x.values()))     # room for two steps' rows (and the latents)
    small = ReferenceCache((limit + 0.5) / 1e9)
    first = run(pipe, "personalize", ref, PROMPTS[0], small)
    assert torch.equal(first, run(pipe, "personalize", ref, PROMPTS[0], full))
    second = run(pipe, "personalize", ref, PROMPTS[1], small)
    assert small.hits == 2 and small.nbytes <= small.limit         # two steps read, two run again from their x
    assert torch.equal(second, run(pipe, "personalize", ref, PROMPTS[1], ReferenceCache(0)))


@pytest.mark.parametrize("method", ["personalize", "freecus"])
def test_own_pass_equals_the_one_batch_up_to_rounding(pipe, method):
    """Without a cache the entry points run [references; targets] in one batch: the same method; the matrix
    products round differently with another number of rows (measured max |diff| ~4e-6 in the latents)."""
    ref = Reference(picture(5), BOX)
    batched = run(pipe, method, ref, PROMPTS[0], None)
    own = run(pipe, method, ref, PROMPTS[0], ReferenceCache(0))
    assert (batched - own).abs().max() < 1e-4
    plain = pipe.generate(PROMPTS[0], height=H, width=W, steps=STEPS, seed=1, return_latents=True)
    assert (plain - own).abs().max() > 1e-2                        # the reference does act


def test_fingerprint_and_limit_checks():
    a = torch.arange(6.0)
    assert fingerprint(a, "x", 1) == fingerprint(a.clone(), "x", 1)
    assert fingerprint(a, "x", 1) != fingerprint(a.view(2, 3), "x", 1)        # shape
    assert fingerprint(a, "x", 1) != fingerprint(a.double(), "x", 1)          # dtype
    assert fingerprint(a, "x", 1) != fingerprint(a + 1e-6, "x", 1)            # one value
    assert fingerprint(["a", "b"]) != fingerprint(["ab"])
    for bad in (-1, float("nan"), float("inf"), "8"):
        with pytest.raises(ValueError, match="limit"):
            ReferenceCache(bad)
