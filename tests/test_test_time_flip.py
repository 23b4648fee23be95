"""model.image.test_time_flip: a photo's inference embedding is the normalised mean of its own and its
mirror image's; training, the image cache key and the train photos of the probe are unchanged by it.

Tolerance: 1e-6 (float32 embeddings of one jitted function, or of two applied to the same inputs).
"""

import numpy as np
import pytest
from multihost_worker import tiny_config, tiny_model

from prodclip import config as config_lib, image_cache
from prodclip.data import synthetic
from prodclip.evaluate import store as store_lib
from prodclip.models import inference


def test_a_photo_and_its_mirror_get_one_embedding_only_with_the_flip():
    config = tiny_config()
    graphdef, params = tiny_model(config)[:2]
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    mirrored = images[:, :, ::-1]
    plain = inference.image_encoder(graphdef, params)
    flip = inference.image_encoder(graphdef, params, test_time_flip=True)
    assert np.abs(plain(images) - plain(mirrored)).max() > 1e-3  # the tower itself is not flip-invariant
    np.testing.assert_allclose(flip(images), flip(mirrored), atol=1e-6)
    mean = plain(images) + plain(mirrored)
    np.testing.assert_allclose(flip(images), mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(flip(images), axis=1), 1.0, atol=1e-6)


def test_embed_source_follows_the_config_and_the_override():
    config = tiny_config(**{"model.image.test_time_flip": True, "data.image_size": 32})
    graphdef, params = tiny_model(config)[:2]
    source = synthetic.make_catalog("val", 6, seed=0, image_size=32)
    from prodclip.data import tokenizer as tokenizer_lib
    tok = tokenizer_lib.tokenizer_from_config(config, [source[i]["title"] for i in range(len(source))], None)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    flipped = inference.embed_images(graphdef, params, source, tok, config)
    single = inference.embed_images(graphdef, params, source, tok, config, test_time_flip=False)
    np.testing.assert_allclose(flipped, inference.image_encoder(graphdef, params, True)(images), atol=1e-6)
    np.testing.assert_allclose(single, inference.image_encoder(graphdef, params)(images), atol=1e-6)


def test_the_flip_leaves_the_cache_key_and_changes_the_store_fingerprint():
    off, on = tiny_config(), tiny_config(**{"model.image.test_time_flip": True})
    graphdef, params = tiny_model(off)[:2]
    assert image_cache.cache_key(params["image_tower"], off, "abc") == image_cache.cache_key(params["image_tower"], on, "abc")
    tok = type("Tok", (), {"hf": type("HF", (), {"get_vocab": lambda self: {"a": 0}})(), "context_length": 8,
                           "lowercase": True})()
    assert store_lib.model_fingerprint(params, tok, off) != store_lib.model_fingerprint(params, tok, on)


def test_the_flip_is_refused_with_a_fusion_encoder():
    with pytest.raises(config_lib.ConfigError, match="test_time_flip"):
        tiny_config(**{"model.image.test_time_flip": True, "model.fusion.enabled": True})
