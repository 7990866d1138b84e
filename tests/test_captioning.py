import numpy as np
import pytest
import torch

from common.data import WordTokenizer
from common.scenes import (
    COLORS,
    SHAPES,
    Scene,
    SceneConfig,
    attribute_scores,
    corpus_bleu,
    heldout_design,
    object_masks,
    object_scores,
    read_coco,
    relation_is_unambiguous,
    render,
    sample_scene,
    scene_dataset,
    write_coco,
)
from common.vision import (
    Captioner,
    CaptionerConfig,
    ViTEncoder,
    beam_captions,
    caption_batches,
    caption_loss,
    decode_caption,
    encode_captions,
    greedy_captions,
    sincos_positions_2d,
)


def test_scenes_are_seeded_and_heldout_pairs_are_separated():
    config = SceneConfig()
    held = set(config.heldout_pairs)
    a = [sample_scene(np.random.default_rng(3), config, heldout=False) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    for heldout in (False, True):
        for _ in range(50):
            scene = sample_scene(rng, config, heldout)
            pairs = {(o.color, o.shape) for o in (scene.first, scene.second)}
            assert bool(pairs & held) == heldout


def test_scene_geometry_matches_the_relation():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = sample_scene(rng, SceneConfig(), heldout=False)
        (x1, y1), (x2, y2) = scene.centres
        expected = {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}
        assert expected[scene.relation]
        image = render(scene, SceneConfig(noise=0), rng)
        assert image.shape == (32, 32, 3) and image.max() > 100  # the objects are drawn


def test_coco_round_trip(tmp_path):
    path = write_coco(tmp_path, "test", 5, SceneConfig(), seed=0, heldout=False)
    data = read_coco(path, tmp_path)
    assert data.images.shape == (5, 3, 32, 32) and 0 <= data.images.min() and data.images.max() <= 1
    assert all(len(c) == 2 for c in data.captions) and data.scenes[0]["relation"] in data.captions[0][0]
    cached = scene_dataset(tmp_path, {"train": 3, "heldout": 2}, SceneConfig(), seed=0)
    assert cached["heldout"].images.shape[0] == 2


def test_attribute_scores_accept_either_reading():
    scene = sample_scene(np.random.default_rng(2), SceneConfig(), heldout=False)
    as_dict = {"first": vars(scene.first), "second": vars(scene.second), "relation": scene.relation}
    for caption in scene.captions():
        assert attribute_scores(caption, as_dict) == {"size": 1, "color": 1, "shape": 1, "relation": 1}
    assert attribute_scores("a cat", as_dict)["color"] == 0.0
    wrong = scene.captions()[0].replace(scene.relation, {"left of": "right of", "right of": "left of",
                                                         "above": "below", "below": "above"}[scene.relation])
    assert attribute_scores(wrong, as_dict)["relation"] == 0.0


def test_bleu_perfect_partial_and_empty():
    refs = [["a small red circle left of a large blue square"]]
    assert corpus_bleu(refs[0], refs)["bleu4"] == pytest.approx(1.0)
    partial = corpus_bleu(["a small red circle above a large blue square"], refs)
    assert 0 < partial["bleu4"] < partial["bleu1"] < 1
    assert corpus_bleu(["zebra"], refs)["bleu1"] == 0.0
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


@pytest.fixture()
def captioner():
    torch.manual_seed(0)
    return Captioner(CaptionerConfig(vocab_size=20, d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1,
                                     max_caption_length=8, dropout=0.0)).eval()


def test_shapes_causality_and_image_dependence(captioner):
    images, tokens = torch.rand(2, 3, 32, 32), torch.randint(0, 20, (2, 6))
    assert ViTEncoder(captioner.config)(images).shape == (2, 64, 32)
    logits = captioner(images, tokens)
    assert logits.shape == (2, 6, 20)
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 20
    torch.testing.assert_close(captioner(images, changed)[:, :4], logits[:, :4])
    assert not torch.allclose(captioner(torch.rand(2, 3, 32, 32), tokens), logits)
    with pytest.raises(ValueError, match="patch_size"):
        CaptionerConfig(vocab_size=5, image_size=30, patch_size=4)


def test_beam_of_one_equals_greedy_and_maps_cover_the_patches(captioner):
    images = torch.rand(3, 3, 32, 32)
    greedy, maps = greedy_captions(captioner, images, bos_id=0, eos_id=0, need_weights=True)
    layers = captioner.cross_attention_layers()
    assert layers.shape == (len(captioner.blocks), 3, greedy.size(1), 64)
    torch.testing.assert_close(layers[-1], maps)
    beam = beam_captions(captioner, images, bos_id=0, eos_id=0, beam=1)
    assert torch.equal(greedy, beam[:, : greedy.size(1)])
    assert maps.shape == (3, greedy.size(1), 64)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, greedy.size(1)))
    wide = beam_captions(captioner, images, bos_id=0, eos_id=0, beam=4)
    assert wide.shape[0] == 3


def test_caption_encoding_and_training_step(captioner):
    tokenizer = WordTokenizer("a red circle left of a blue square\n")
    tokens = encode_captions(tokenizer, [["a red circle", "a blue square"]], length=8)
    assert tokens.shape == (1, 2, 8) and tokens[0, 0, 0] == tokenizer.eos_id and tokens[0, 0, -1] == -100
    assert decode_caption(tokenizer, tokens[0, 0, 1:].clamp(min=0)) == "a red circle"
    with pytest.raises(ValueError, match="length"):
        encode_captions(tokenizer, [["a red circle left of a blue square a red"]], length=8)
    images = torch.rand(1, 3, 32, 32)
    batch = caption_batches(images, tokens, 4)(torch.Generator().manual_seed(0))
    captioner.train()
    loss = caption_loss(captioner, batch)
    loss.backward()
    assert torch.isfinite(loss) and captioner.encoder.patch_embedding.weight.grad.abs().sum() > 0


def test_sincos_patch_positions_code_row_and_column_and_are_fixed():
    positions = sincos_positions_2d(side=4, d_model=16)  # (16 patches, 16)
    assert positions.shape == (16, 16)
    row_code, col_code = positions[:, :8], positions[:, 8:]
    assert torch.equal(row_code[0], row_code[3]) and not torch.equal(row_code[0], row_code[4])  # same row
    assert torch.equal(col_code[0], col_code[4]) and not torch.equal(col_code[0], col_code[1])  # same column
    assert len({tuple(p.tolist()) for p in positions}) == 16  # every patch has its own code
    config = CaptionerConfig(vocab_size=10, d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1)
    encoder = Captioner(config).encoder
    assert "position_embedding" not in dict(encoder.named_parameters())
    learned = Captioner(CaptionerConfig(vocab_size=10, d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1,
                                        patch_positions="learned")).encoder
    assert "position_embedding" in dict(learned.named_parameters())
    with pytest.raises(ValueError, match="patch_positions"):
        CaptionerConfig(vocab_size=10, patch_positions="rope")
    with pytest.raises(ValueError, match="multiple of 4"):
        CaptionerConfig(vocab_size=10, d_model=18, n_heads=2)


def test_encoder_refuses_an_image_of_another_size(captioner):
    encoder = captioner.encoder
    assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 64, 32)
    for shape in ((1, 3, 34, 34), (1, 3, 35, 35), (1, 3, 36, 36), (1, 1, 32, 32), (3, 32, 32)):
        with pytest.raises(ValueError, match="image_size|shape"):
            encoder(torch.rand(*shape))


def test_relations_are_unambiguous_and_masks_follow_the_scene():
    rng = np.random.default_rng(4)
    config = SceneConfig(colors=tuple(COLORS), shapes=SHAPES, heldout_pairs=())
    for _ in range(300):
        scene = sample_scene(rng, config, heldout=False)
        assert relation_is_unambiguous(scene)
        masks = object_masks(scene, config.image_size)
        assert masks.shape == (2, 32, 32) and masks[0].sum() > 4 and masks[1].sum() > 4
        assert not (masks[0] & masks[1]).any()
        image = render(scene, SceneConfig(colors=tuple(COLORS), shapes=SHAPES, heldout_pairs=(), noise=0), rng)
        for obj, mask in zip((scene.first, scene.second), masks):
            assert (image[mask] == COLORS[obj.color]).all()  # the mask is exactly the object's pixels
    ambiguous = Scene(scene.first, "left of", scene.second, ((0.2, 0.2), (0.8, 0.8)))
    assert not relation_is_unambiguous(ambiguous)


def test_heldout_design_spreads_pairs_and_keeps_every_attribute_seen():
    pairs = heldout_design(("red", "green", "blue"), ("circle", "square", "triangle"), 1 / 3)
    assert len(set(pairs)) == 3
    assert {c for c, _ in pairs} == {"red", "green", "blue"}
    assert {s for _, s in pairs} == {"circle", "square", "triangle"}
    big = heldout_design(tuple(COLORS), SHAPES, 0.25)
    assert len(set(big)) == 12
    config = SceneConfig(colors=tuple(COLORS), shapes=SHAPES, heldout_pairs=big)
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, config, heldout=False)
        assert {(o.color, o.shape) for o in (scene.first, scene.second)}.isdisjoint(big)
    with pytest.raises(ValueError, match="share"):
        heldout_design(("red", "green"), ("circle", "square"), 0.9)
    with pytest.raises(ValueError, match="every pair"):
        SceneConfig(heldout_pairs=(("red", "circle"), ("red", "square"), ("red", "triangle")))
    with pytest.raises(ValueError, match="colors"):
        SceneConfig(colors=("red", "mauve"))


def test_object_scores_pair_said_objects_by_the_relation():
    scene = {"first": {"size": "small", "color": "blue", "shape": "circle"}, "relation": "left of",
             "second": {"size": "large", "color": "red", "shape": "square"}}
    right = object_scores("a small blue circle left of a large red square", scene)
    assert [(o["color"], o["shape"]) for o in right] == [(True, True), (True, True)]
    flipped = object_scores("a large red square right of a small blue square", scene)
    assert flipped[0] == {"color": True, "shape": False, "said": "blue square", "position": 1} and flipped[1]["shape"]
    assert [o["position"] for o in right] == [0, 1]
    # the relation fixes the reading even when the other reading would fit the colours better
    swapped = object_scores("a small red square left of a large blue circle", scene)
    assert not swapped[0]["color"] and not swapped[0]["shape"]
    assert object_scores("a blue thing", scene)[0] == {"color": False, "shape": False, "said": None, "position": None}


def test_word_dropout_hides_words_in_training_only():
    config = CaptionerConfig(vocab_size=12, d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1,
                             max_caption_length=8, dropout=0.0, word_dropout=0.5)
    torch.manual_seed(0)
    model = Captioner(config)
    images, tokens = torch.rand(2, 3, 32, 32), torch.randint(0, 12, (2, 8))
    model.eval()
    assert torch.equal(model(images, tokens), model(images, tokens))  # off in evaluation
    model.train()
    first, second = model(images, tokens), model(images, tokens)
    assert not torch.equal(first, second)  # words hidden at random while training
    assert torch.allclose(first[:, 0], second[:, 0])  # the start token is never hidden, and position 0 sees only it
    with pytest.raises(ValueError, match="word_dropout"):
        CaptionerConfig(vocab_size=12, word_dropout=1.0)

