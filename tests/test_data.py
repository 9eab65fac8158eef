"""Toy data: point clouds at their advertised scale, shapes pictures that show what they say."""

import subprocess
import sys

import numpy as np
import pytest

from minidiff.data import (COLORS, POINT_CLOUDS, POSITIONS, SHAPES, SIZES, TOY_MIXTURE, ShapesDataset, ShapeSpec,
                           caption, render, split_class, to_unit_range, without_size)

# Written out by hand here, independently of minidiff.data, so that the captions are checked.
PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
           "left": "on the left", "center": "in the center", "right": "on the right",
           "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}


def test_importing_data_loads_no_jax():
    code = "import sys, minidiff.data; assert 'jax' not in sys.modules, 'minidiff.data imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- point clouds ---

@pytest.mark.parametrize("name", sorted(POINT_CLOUDS))
def test_point_clouds_are_seeded_float32_pairs(name):
    make = POINT_CLOUDS[name]
    x = make(5000, np.random.default_rng(1))
    assert x.shape == (5000, 2) and x.dtype == np.float32
    np.testing.assert_array_equal(x, make(5000, np.random.default_rng(1)))
    assert not np.array_equal(x, make(5000, np.random.default_rng(2)))


@pytest.mark.parametrize("name", ["moons", "swissroll"])
def test_moons_and_roll_have_unit_scale(name):
    x = POINT_CLOUDS[name](20_000, np.random.default_rng(0))
    assert np.all(np.abs(x.mean(0)) < 0.05)
    rms_std = np.sqrt(x.var(0).mean())
    assert abs(rms_std - 1) < 0.05, rms_std


def test_mixture_is_the_oracle_mixture_at_its_own_scale():
    import minidiff.demo

    assert minidiff.demo.TOY_MIXTURE is TOY_MIXTURE  # the demo and lesson 02 draw the same data
    x = POINT_CLOUDS["mixture"](20_000, np.random.default_rng(0))
    assert 1.3 < np.sqrt(x.var(0).mean()) < 1.6  # std ~1.43 per axis, computed from the mixture
    np.testing.assert_allclose(x.mean(0), TOY_MIXTURE.weights @ TOY_MIXTURE.means, atol=0.05)


# --- shapes: arrays, determinism, captions ---

def test_sample_arrays_and_labels():
    ds = ShapesDataset()
    images, labels, captions = ds.sample(64)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert set(labels) == {"shape", "color", "size", "position", "class"}
    for attr, names in ds.attributes.items():
        assert labels[attr].shape == (64,) and labels[attr].dtype.kind == "i"
        assert labels[attr].min() >= 0 and labels[attr].max() < len(names)
    assert len(captions) == 64 and all(isinstance(c, str) for c in captions)
    x = to_unit_range(images)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    assert ShapesDataset(size=48).sample(2)[0].shape == (2, 48, 48, 3)


def test_same_seed_same_pictures():
    a = ShapesDataset(seed=3).sample(40)
    b = ShapesDataset(seed=3).sample(40)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2]
    c = ShapesDataset(seed=0).sample(40, np.random.default_rng(3))
    d = ShapesDataset(seed=9).sample(40, np.random.default_rng(3))  # an explicit rng wins over the seed
    np.testing.assert_array_equal(c[0], d[0])
    assert not np.array_equal(a[0], ShapesDataset(seed=4).sample(40)[0])


def test_jitter_makes_pictures_of_one_combination_differ():
    """Shifts and sizes are drawn on an 8x finer grid (SUPERSAMPLE), so a few hundred distinct
    pictures exist per combination: 50 draws repeat one now and then (birthday problem), not often."""
    images, _, _ = ShapesDataset(shapes=["circle"], colors=["red"], sizes=["large"], positions=["center"]).sample(50)
    assert len({im.tobytes() for im in images}) >= 45
    still = ShapesDataset(shapes=["circle"], colors=["red"], sizes=["large"], positions=["center"], jitter=False)
    assert len({im.tobytes() for im in still.sample(5)[0]}) == 1


def test_captions_match_labels():
    ds = ShapesDataset(shapes=tuple(SHAPES), colors=tuple(COLORS))
    _, labels, captions = ds.sample(300, np.random.default_rng(0))
    for i, text in enumerate(captions):
        name = {attr: ds.attributes[attr][labels[attr][i]] for attr in ds.attributes}
        assert text == f"a {name['size']} {name['color']} {name['shape']} {PHRASES[name['position']]}"


# --- shapes: the pictures show what the labels say ---

@pytest.mark.parametrize("size", [32, 64])
def test_every_combination_has_its_colour_at_the_centre(size):
    """Without jitter, the pixel at the centre of the shape's grid cell is exactly the colour."""
    for shape in SHAPES:
        for color, rgb in COLORS.items():
            for sz in SIZES:
                for position, (row, col) in POSITIONS.items():
                    image = render(ShapeSpec(shape, color, sz, position), size)
                    cy, cx = int((row + 0.5) * size / 3), int((col + 0.5) * size / 3)
                    np.testing.assert_allclose(image[cy, cx], rgb, atol=2, err_msg=f"{shape} {color} {sz} {position}")


def test_sampled_shapes_lie_in_their_cell_and_show_their_colour():
    ds = ShapesDataset(shapes=tuple(SHAPES), colors=tuple(COLORS))
    images, labels, _ = ds.sample(500, np.random.default_rng(1))
    cell = ds.size / 3
    rows, cols = np.mgrid[0:ds.size, 0:ds.size] + 0.5  # pixel centres
    for im, shape_i, color_i, pos_i in zip(images, labels["shape"], labels["color"], labels["position"]):
        row, col = POSITIONS[ds.positions[pos_i]]
        ink = im.max(-1).astype(float)
        assert ink.sum() > 0
        cy, cx = (ink * rows).sum() / ink.sum(), (ink * cols).sum() / ink.sum()  # centre of mass
        assert int(cy // cell) == row and int(cx // cell) == col
        r_ink, c_ink = np.nonzero(ink)  # and nothing is drawn outside the cell (plus a pixel of edge)
        assert r_ink.min() >= row * cell - 1 and r_ink.max() < (row + 1) * cell + 1
        assert c_ink.min() >= col * cell - 1 and c_ink.max() < (col + 1) * cell + 1
        np.testing.assert_allclose(im[int(cy), int(cx)], COLORS[ds.colors[color_i]], atol=2)
        assert ds.shapes[shape_i] in SHAPES


def test_large_shapes_cover_more_than_small_ones():
    for shape in SHAPES:
        area = {sz: render(ShapeSpec(shape, "red", sz, "center")).max(-1).sum() for sz in SIZES}
        assert area["large"] > 1.6 * area["small"], (shape, area)


def test_shapes_differ_from_each_other():
    pictures = [render(ShapeSpec(s, "red", "large", "center")).astype(int) for s in SHAPES]
    for i in range(len(pictures)):
        for j in range(i):
            assert np.abs(pictures[i] - pictures[j]).sum() > 500 * 3


def test_caption_of_a_spec():
    assert caption(ShapeSpec("circle", "red", "small", "top left")) == "a small red circle in the top left"
    assert caption(ShapeSpec("square", "blue", "large", "center")) == "a large blue square in the center"


# --- held-out combinations and classes ---

def test_held_out_combinations_never_appear():
    ds = ShapesDataset(exclude=[("circle", "red"), ("square", "top left")])
    _, labels, captions = ds.sample(3000)
    names = {a: np.array(ds.attributes[a])[labels[a]] for a in ds.attributes}
    assert not np.any((names["shape"] == "circle") & (names["color"] == "red"))
    assert not np.any((names["shape"] == "square") & (names["position"] == "top left"))
    assert not any("red circle" in c or ("square" in c and "top left" in c) for c in captions)
    assert np.any(names["shape"] == "circle") and np.any(names["color"] == "red")  # the rest is still there

    _, _, held_captions = ds.held_out().sample(500)
    assert all("red circle" in c or ("square" in c and "top left" in c) for c in held_captions)
    assert len(ds.combinations) + len(ds.held_out().combinations) == 3 * 4 * 2 * 9


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        ShapeSpec("hexagon", "red")
    with pytest.raises(ValueError, match="colors"):
        ShapesDataset(colors=["red", "mauve"])
    with pytest.raises(ValueError, match="not in this dataset"):
        ShapesDataset(exclude=[("circle", "magenta")])
    with pytest.raises(ValueError, match="no combination"):
        ShapesDataset(shapes=["circle"], exclude=[("circle",)])
    with pytest.raises(ValueError, match="holds nothing out"):
        ShapesDataset().held_out()


def test_without_size_drops_only_the_size_word():
    ds = ShapesDataset()
    for text, names in zip(ds.captions(), ds.combinations):
        spec = ShapeSpec(*names)
        assert without_size(text) == caption(spec).replace(f"a {spec.size} ", "a ")
        assert spec.size in text.split() and spec.size not in without_size(text).split()
    assert without_size("a red circle on the left") == "a red circle on the left"


def test_class_index_round_trip():
    ds = ShapesDataset(colors=tuple(COLORS))
    _, labels, _ = ds.sample(500)
    k = ds.class_index(labels)
    np.testing.assert_array_equal(k, labels["class"])
    assert k.min() >= 0 and k.max() < ds.num_classes == 3 * 6
    back = ds.class_labels(k)
    np.testing.assert_array_equal(back["shape"], labels["shape"])
    np.testing.assert_array_equal(back["color"], labels["color"])
    assert ds.class_name(ds.class_index({"shape": 2, "color": 1})) == "green triangle"
    # the same rule under jax.jit (ClassTokens splits traced labels with it)
    import jax

    traced = jax.jit(lambda c: split_class(c, len(ds.colors)))(k)
    np.testing.assert_array_equal(np.stack(traced), np.stack([back["shape"], back["color"]]))
