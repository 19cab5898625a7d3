"""The procedural world: deterministic, captions say what is drawn, detectors read the renders back."""
import random

import numpy as np
import pytest

from minidit.weights import world


def test_scenes_and_renders_are_deterministic():
    a = [world.sample_scene(random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    assert np.array_equal(np.asarray(world.render(a[0])), np.asarray(world.render(a[1])))


def test_caption_names_every_attribute_without_dropout():
    rng = random.Random(1)
    for _ in range(50):
        s = world.sample_scene(rng)
        c = world.caption(s)
        for p in s.objects:
            assert p.subject.shape in c and p.subject.colour in c and p.position in c
            assert (p.subject.texture in c) == (p.subject.texture != "plain")
        assert s.bg in c
        assert " a a" not in c and " a o" not in c.replace(" a on", "")  # "an orange", not "a orange"


def test_caption_dropout_keeps_the_shape():
    rng = random.Random(2)
    s = world.sample_scene(rng, n_objects=1)
    caps = {world.caption(s, rng, 0.5) for _ in range(40)}
    assert len(caps) > 3 and all(s.objects[0].subject.shape in c for c in caps)


def test_caption_dropout_never_drops_the_texture():
    """A subject named without a texture word is plain: textured objects always say theirs, whatever `drop`."""
    rng = random.Random(6)
    textured = 0
    for _ in range(300):
        s = world.sample_scene(rng, n_objects=1)
        c = world.caption(s, rng, 0.9)
        t = s.objects[0].subject.texture
        assert (t in c) == (t != "plain")
        textured += t != "plain"
    assert textured > 100  # the check saw many textured subjects


def test_background_colours_differ_from_objects():
    rng = random.Random(4)
    for _ in range(200):
        s = world.sample_scene(rng)
        assert all(p.subject.colour not in (s.bg, s.bg2) for p in s.objects)


def test_detectors_read_the_renderer():
    """On rendered single-object flat scenes the detectors are (nearly) exact: they can judge generated images."""
    rng = random.Random(5)
    hits, n = {"colour": 0, "shape": 0, "position": 0, "background": 0}, 0
    while n < 60:
        s = world.sample_scene(rng, n_objects=1)
        if s.background != "flat":
            continue
        n += 1
        d = world.detect_object(np.asarray(world.render(s)))
        p = s.objects[0]
        hits["colour"] += d["colour"] == p.subject.colour
        hits["shape"] += d["shape"] == p.subject.shape
        hits["position"] += d["position"] == p.position
        hits["background"] += d["background"] == s.bg
    assert all(v >= 0.95 * n for v in hits.values()), hits


def test_shape_detector_tells_shapes_apart():
    for shape in world.SHAPES:
        m = world.shape_mask(shape, 100, 120, 50, 256) > 0.5
        assert world.detect_shape(m) == shape


def test_subject_pattern_moves_with_the_subject():
    """A subject re-drawn elsewhere is the same picture, shifted: what personalization is measured against."""
    sub = world.Subject("square", "red", "striped", angle=45, period=0.06, phase=0.3)
    a = world.Scene((world.Placed(sub, "", "on the left", 0.25, 0.5),), "flat", "blue")
    b = world.moved(a, 0, cx=0.25 + 96 / 256, position="on the right")
    ia, ib = np.asarray(world.render(a)).astype(int), np.asarray(world.render(b)).astype(int)
    assert np.abs(np.roll(ia, 96, axis=1) - ib).mean() < 1.0
    masks = world.object_masks(b)
    assert masks.shape == (1, 256, 256) and 0.05 < masks.mean() < 0.2


@pytest.mark.parametrize("colour", list(world.COLOURS))
def test_tint_reads_as_its_colour(colour):
    t = np.array([world.tint(colour)], np.uint8)
    assert list(world.COLOURS)[world.nearest_colour(t)[0]] == colour
