"""The shapes classifier: it learns to read the pictures, and it is a judge that can say no."""

import jax
import numpy as np
import pytest

import minidiff.train.classifier as tc
from minidiff.data import ShapesDataset
from minidiff.nn.classifier import ShapesClassifier

DATASET = ShapesDataset()


@pytest.fixture(scope="module")
def trained():
    """A briefly trained classifier (about 30 s on 2 CPU cores)."""
    return tc.train_classifier(DATASET, steps=300, batch=64, lr=3e-3, pool=5000, seed=0)


@pytest.fixture(scope="module")
def held_out_pictures():
    """Fresh pictures, drawn with a seed the training pool never used."""
    return ShapesDataset(seed=2024).sample(2000)


@pytest.mark.slow
def test_brief_training_reads_fresh_pictures(trained, held_out_pictures):
    images, labels, _ = held_out_pictures
    acc = tc.score(trained, images, labels)
    assert set(acc) == {"shape", "color", "size", "position", "joint"}
    assert acc["joint"] >= 0.95, acc
    assert acc["color"] >= 0.99 and acc["position"] >= 0.99, acc


@pytest.mark.slow
def test_wrong_labels_score_low(trained, held_out_pictures):
    images, labels, _ = held_out_pictures
    wrong = dict(labels, shape=(labels["shape"] + 1) % len(DATASET.shapes))  # every shape label wrong
    acc = tc.score(trained, images, wrong)
    assert acc["shape"] < 0.05 and acc["joint"] < 0.05, acc
    assert acc["color"] >= 0.99  # the other attributes are still read right
    wrong_place = dict(labels, position=(labels["position"] + 4) % len(DATASET.positions))
    assert tc.score(trained, images, wrong_place)["position"] < 0.05


@pytest.mark.slow
def test_save_and_load_give_the_same_judge(trained, held_out_pictures, tmp_path):
    images = held_out_pictures[0][:200]
    path = tc.save_params(tmp_path / "clf.msgpack", trained)
    loaded = tc.load_params(path)
    for k, v in tc.predict(trained, images).items():
        np.testing.assert_array_equal(tc.predict(loaded, images)[k], v)


def _untrained_params(dataset=DATASET, seed=0):
    model = ShapesClassifier(tc.heads_for(dataset))
    return model.init(jax.random.key(seed), np.zeros((1, dataset.size, dataset.size, 3), np.float32))["params"]


def test_architecture_is_read_off_the_params():
    model = ShapesClassifier((("shape", 5), ("color", 6)), stem=8, features=(16, 24), hidden=32)
    params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    assert ShapesClassifier.from_params(params) == model
    logits = model.apply({"params": params}, np.zeros((7, 32, 32, 3), np.float32))
    assert logits["shape"].shape == (7, 5) and logits["color"].shape == (7, 6)


def test_cached_classifier_trains_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path))
    calls = []

    def fake_train(dataset, **kw):
        calls.append((dataset, kw))
        return _untrained_params(dataset, seed=len(calls))

    monkeypatch.setattr(tc, "train_classifier", fake_train)
    first = tc.cached_classifier(DATASET)
    files = list(tmp_path.glob("shapes_classifier_*.msgpack"))
    assert len(calls) == 1 and len(files) == 1
    again = tc.cached_classifier(ShapesDataset(seed=5, exclude=[("circle", "red")]))  # same attributes: same file
    assert len(calls) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
    assert calls[0][0].exclude == ()  # trained on every combination, held-out ones included

    tc.cached_classifier(ShapesDataset(colors=("red", "green", "blue", "yellow", "cyan")))  # other attributes
    assert len(calls) == 2 and len(list(tmp_path.glob("*.msgpack"))) == 2
    (tmp_path / files[0].name).write_bytes(b"not msgpack")  # a damaged cache file is retrained, not fatal
    tc.cached_classifier(DATASET)
    assert len(calls) == 3


def test_bad_input_is_a_clear_error(tmp_path):
    params = _untrained_params()
    with pytest.raises(ValueError, match="uint8"):
        tc.predict(params, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="no attribute"):
        tc.score(params, np.zeros((2, 32, 32, 3), np.uint8), {"class": np.zeros(2, int)})
    (tmp_path / "junk.msgpack").write_bytes(b"\x00\x01junk")
    with pytest.raises(ValueError, match="cannot read"):
        tc.load_params(tmp_path / "junk.msgpack")
    with pytest.raises(ValueError, match="not found"):
        tc.load_params(tmp_path / "missing.msgpack")
