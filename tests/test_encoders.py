"""Foundation encoders: shapes, preprocessing, weights loading, determinism, fingerprints, meta."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from svam.config import load_config
from svam.teachers.configuration_encoders import EncodersConfig
from svam.teachers.encoders import (
    EncoderWeightsError,
    GeometricEncoder,
    SemanticEncoder,
    build_encoders,
)

# Written out here, not imported: the reference the encoders' own constants are checked against.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = 28  # 2x2 patches: the fastest size that still has a spatial grid


def frames(*shape, size=SMALL, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*shape, 3, size, size), dtype=torch.uint8, generator=generator)


def hand_normalised(images):
    return (images.float() / 255 - IMAGENET_MEAN) / IMAGENET_STD


def state_digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and run 50x slower with two threads when
    another process keeps a core of this 2-core machine busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def semantic():
    return SemanticEncoder(image_size=SMALL)


@pytest.fixture(scope="module")
def geometric():
    return GeometricEncoder(image_size=SMALL)


@pytest.fixture(scope="module")
def da3_small_dir(tmp_path_factory):
    """A da3-small directory as DA3 itself saves one (config.json + model.safetensors)."""
    from svam.teachers.encoders import _import_da3

    da3_class, _ = _import_da3()
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("da3") / "DA3-SMALL"
    da3_class(model_name="da3-small").save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------ shapes


def test_tiny_config_shapes_and_dtypes():
    semantic, geometric = build_encoders(EncodersConfig())
    clips = frames(2, 3, size=64)  # resized to the configured 56 px: 4x4 patches

    tokens = semantic(clips)
    assert tokens.shape == (2, 3, 16, 384) and tokens.dtype == torch.float32
    assert semantic(clips[:, 0]).shape == (2, 16, 384)
    assert (semantic.num_tokens, semantic.out_dim) == (16, 384)

    tokens = geometric(clips)
    assert tokens.shape == (2, 3, 16, 768) and tokens.dtype == torch.float32
    assert geometric(clips[:, :1]).shape == (2, 1, 16, 768)
    assert (geometric.num_tokens, geometric.out_dim) == (16, 768)


def test_semantic_drops_class_and_register_tokens(semantic):
    images = frames(2)
    with torch.inference_mode():
        everything = semantic.vit.forward_features(semantic.preprocess(images))
    assert everything.shape[1] == 1 + 4
    torch.testing.assert_close(semantic(images), everything[:, 1:], rtol=0, atol=0)

    registers = SemanticEncoder("vit_small_patch14_reg4_dinov2", SMALL)
    with torch.inference_mode():
        everything = registers.vit.forward_features(registers.preprocess(images))
    assert everything.shape[1] == 1 + 4 + 4
    torch.testing.assert_close(registers(images), everything[:, 5:], rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, -1])
def test_geometric_tokens_are_those_of_the_chosen_out_layer(layer):
    """Running only the blocks up to the layer gives what the full backbone gives for it."""
    encoder = GeometricEncoder(image_size=SMALL, layer=layer)
    clips = frames(2, 3)
    with torch.inference_mode():
        layers, _ = encoder.backbone(encoder.preprocess(clips), export_feat_layers=[])
    assert encoder.block == encoder.backbone.out_layers[layer]
    torch.testing.assert_close(encoder(clips), layers[layer][0], rtol=0, atol=0)


def test_geometric_camera_token_is_prepended(geometric):
    with_camera = GeometricEncoder(image_size=SMALL, camera_token=True)
    clips = frames(1, 3)
    with torch.inference_mode():
        ((_, camera), *_), _ = geometric.backbone(
            geometric.preprocess(clips), export_feat_layers=[]
        )
    tokens = with_camera(clips)
    assert tokens.shape == (1, 3, 5, 768) and with_camera.num_tokens == 5
    torch.testing.assert_close(tokens[:, :, 0], camera, rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, :, 1:], geometric(clips), rtol=0, atol=0)


def test_geometric_takes_clips_only(geometric):
    with pytest.raises(ValueError, match=r"clips \(B, T, 3, H, W\).*frames\[:, None\]"):
        geometric(frames(2))


def test_geometric_depth_maps(geometric):
    depth = geometric.depth(frames(2, 3, size=40))
    assert depth.shape == (2, 3, SMALL, SMALL) and depth.dtype == torch.float32
    assert torch.isfinite(depth).all() and (depth > 0).all()


def test_bfloat16_compute_returns_float32_tokens(semantic, geometric):
    clips = frames(1, 3)
    for reference in (semantic, geometric):
        encoder = type(reference)(image_size=SMALL, dtype=torch.bfloat16)
        tokens = encoder(clips)
        assert tokens.dtype == torch.float32
        torch.testing.assert_close(tokens, reference(clips), rtol=0.05, atol=0.1)


def test_da3_is_quiet(capfd):
    GeometricEncoder(image_size=SMALL)(frames(1, 3))  # 3 views: DA3 logs its reference choice
    out, err = capfd.readouterr()
    assert "INFO" not in out + err and "gsplat" not in out + err


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("encoder", ["semantic", "geometric"])
def test_preprocess_is_imagenet_normalisation_done_once(encoder, request):
    """Fails if an image is normalised twice, or with other statistics than ImageNet's."""
    encoder = request.getfixturevalue(encoder)
    clips = frames(2, 3)
    expected = hand_normalised(clips)
    torch.testing.assert_close(encoder.preprocess(clips), expected, rtol=0, atol=1e-6)

    # The forward pass applies exactly that preprocessing, and nothing more.
    def net(x):
        if isinstance(encoder, SemanticEncoder):
            return encoder.vit.forward_features(x.flatten(0, 1))[:, 1:].unflatten(0, (2, 3))
        layers, _ = encoder.backbone(x, export_feat_layers=[])
        return layers[0][0]

    with torch.inference_mode():
        reference = net(expected)
        twice = net((expected - IMAGENET_MEAN) / IMAGENET_STD)
        other_stats = net((clips.float() / 255 - 0.5) / 0.5)
    tokens = encoder(clips)
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    # ...and this comparison would catch a second normalisation or other statistics.
    assert (tokens - twice).abs().max() > 1e-2
    assert (tokens - other_stats).abs().max() > 1e-2


def test_preprocess_resizes_to_the_image_size(semantic):
    flat = torch.full((1, 3, 64, 48), 200, dtype=torch.uint8)  # any size: resized to 28 x 28
    resized = semantic.preprocess(flat)
    assert resized.shape == (1, 3, SMALL, SMALL)
    torch.testing.assert_close(resized, hand_normalised(flat[..., :SMALL, :SMALL]))


@pytest.mark.parametrize("encoder", ["semantic", "geometric"])
def test_float_input_is_refused(encoder, request):
    encoder = request.getfixturevalue(encoder)
    clips = frames(1, 3)
    for already_done in (clips.float() / 255, hand_normalised(clips)):
        with pytest.raises(TypeError, match="raw uint8 RGB frames.*normalises them itself"):
            encoder(already_done)


# ------------------------------------------------------------------------------- bad config


def test_image_size_must_be_a_multiple_of_14():
    with pytest.raises(ValueError, match=r"^encoders.semantic_image_size=50 .* 14 \(try 56\)$"):
        SemanticEncoder(image_size=50)
    with pytest.raises(ValueError, match=r"^encoders.geometric_image_size=64 .* \(try 70\)$"):
        GeometricEncoder(image_size=64)
    with pytest.raises(ValueError, match="encoders.geometric_image_size=100"):
        build_encoders(EncodersConfig(geometric_image_size=100))


def test_unknown_models_and_layers():
    with pytest.raises(ValueError, match="encoders.semantic_model='vit_small_patch16_224'"):
        SemanticEncoder("vit_small_patch16_224")
    with pytest.raises(ValueError, match="encoders.geometric_model='da4-small'.*da3-large"):
        GeometricEncoder("da4-small")
    with pytest.raises(ValueError, match=r"encoders.geometric_layer=4: da3-small has 4 out-layers"):
        GeometricEncoder(image_size=SMALL, layer=4)


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert str(fragment) in message, message


def test_missing_weights(tmp_path):
    with pytest.raises(EncoderWeightsError) as error:
        SemanticEncoder(image_size=SMALL, weights=tmp_path / "dinov2.safetensors")
    assert_one_line(error, "encoders.semantic_weights", tmp_path / "dinov2.safetensors")

    with pytest.raises(EncoderWeightsError) as error:
        GeometricEncoder(image_size=SMALL, weights=tmp_path / "DA3")
    assert_one_line(error, "encoders.geometric_weights", tmp_path / "DA3")

    (tmp_path / "DA3").mkdir()
    (tmp_path / "DA3" / "config.json").write_text('{"model_name": "da3-small"}')
    with pytest.raises(EncoderWeightsError) as error:
        GeometricEncoder(image_size=SMALL, weights=tmp_path / "DA3")
    assert_one_line(error, tmp_path / "DA3", "model.safetensors")

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError) as error:
        SemanticEncoder(image_size=SMALL, weights=tmp_path / "junk.pth")
    assert_one_line(error, tmp_path / "junk.pth", "not a readable state dict")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_semantic_weights_of_another_size_are_refused(tmp_path, suffix):
    # A ViT-B/14 DINOv2 (one block is enough to have ViT-B's widths) saved as a state dict.
    base = timm.create_model("vit_base_patch14_dinov2", img_size=SMALL, depth=1)
    path = tmp_path / f"vitb14{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(base.state_dict(), path)
    else:
        torch.save(base.state_dict(), path)
    with pytest.raises(EncoderWeightsError) as error:
        SemanticEncoder(image_size=SMALL, weights=path)
    assert_one_line(error, path, "does not fit vit_small_patch14_dinov2", "size mismatch for")


def test_semantic_loads_timm_and_original_dinov2_checkpoints(tmp_path, semantic):
    images = frames(2)
    timm_file = tmp_path / "timm.safetensors"
    safetensors.torch.save_file(semantic.vit.state_dict(), timm_file)
    loaded = SemanticEncoder(image_size=SMALL, weights=timm_file, seed=7)
    torch.testing.assert_close(loaded(images), semantic(images), rtol=0, atol=0)

    # facebookresearch/dinov2 hub naming: a mask token, the position embedding of 518 px.
    original = dict(semantic.vit.state_dict())
    original["mask_token"] = torch.zeros(1, 384)
    original["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384)
    hub_file = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(original, hub_file)
    loaded = SemanticEncoder(image_size=SMALL, weights=hub_file)
    assert loaded.vit.pos_embed.shape == (1, 1 + 4, 384)
    torch.testing.assert_close(loaded.vit.cls_token, semantic.vit.cls_token)
    assert loaded(images).shape == (2, 4, 384)


def test_geometric_loads_a_da3_directory(da3_small_dir, geometric):
    loaded = GeometricEncoder(image_size=SMALL, weights=da3_small_dir)
    random_init = GeometricEncoder(image_size=SMALL, seed=1)
    assert state_digest(loaded) == state_digest(random_init) != state_digest(geometric)


def test_geometric_weights_of_another_architecture_are_refused(da3_small_dir, tmp_path):
    with pytest.raises(EncoderWeightsError) as error:
        GeometricEncoder("da3-base", SMALL, weights=da3_small_dir)
    assert_one_line(error, da3_small_dir, "holds a da3-small model", "is da3-base")

    # A config that lies about the weights: they do not fit the architecture it names.
    corrupt = tmp_path / "DA3-CORRUPT"
    corrupt.mkdir()
    (corrupt / "model.safetensors").symlink_to(da3_small_dir / "model.safetensors")
    (corrupt / "config.json").write_text(json.dumps({"model_name": "da3-base"}))
    with pytest.raises(EncoderWeightsError) as error:
        GeometricEncoder("da3-base", SMALL, weights=corrupt)
    assert_one_line(error, corrupt, "does not fit da3-base", "size mismatch for")


# ------------------------------------------------------------------ determinism, fingerprints


def test_random_init_is_deterministic_and_leaves_the_callers_rng_alone(semantic, geometric):
    clips = frames(1, 3)
    rng = torch.get_rng_state()
    again = build_encoders(EncodersConfig(semantic_image_size=SMALL, geometric_image_size=SMALL))
    assert torch.equal(torch.get_rng_state(), rng)
    for first, second in zip((semantic, geometric), again, strict=True):
        torch.testing.assert_close(first(clips), second(clips), rtol=0, atol=0)
    assert state_digest(GeometricEncoder(image_size=SMALL, seed=1)) != state_digest(geometric)


def test_random_init_is_identical_in_another_process(semantic, geometric):
    """Also a fresh import of DA3: nothing of its logging or import warnings gets through."""
    script = (
        "import sys, torch; sys.path.insert(0, '.'); torch.set_num_threads(1); torch.manual_seed(123);"
        "from tests.test_encoders import state_digest;"
        "from svam.teachers.encoders import build_encoders;"
        "from svam.teachers.configuration_encoders import EncodersConfig;"
        f"pair = build_encoders(EncodersConfig(semantic_image_size={SMALL}, "
        f"geometric_image_size={SMALL}));"
        "print(*(state_digest(e) for e in pair))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [state_digest(semantic), state_digest(geometric)]
    assert result.stderr == ""


def test_fingerprints_follow_what_decides_the_tokens(semantic, geometric, da3_small_dir):
    assert semantic.fingerprint.startswith("vit_small_patch14_dinov2-28px-")
    assert semantic.fingerprint == SemanticEncoder(image_size=SMALL).fingerprint
    assert geometric.fingerprint == GeometricEncoder(image_size=SMALL).fingerprint
    variants = [
        geometric,
        GeometricEncoder(image_size=42),
        GeometricEncoder(image_size=SMALL, layer=1),
        GeometricEncoder(image_size=SMALL, camera_token=True),
        GeometricEncoder(image_size=SMALL, seed=1),
        GeometricEncoder(image_size=SMALL, dtype=torch.bfloat16),
        GeometricEncoder(image_size=SMALL, weights=da3_small_dir),
        GeometricEncoder("da3-base", SMALL, device="meta"),
    ]
    fingerprints = [encoder.fingerprint for encoder in variants]
    assert len(set(fingerprints)) == len(fingerprints), fingerprints
    # Same seed, same weights, yet a different fingerprint: a file's content, not its origin.
    assert fingerprints[4] != fingerprints[6]


def test_full_scale_configs_on_the_meta_device():
    """The published setting (configs/svd-xt.yaml), built without allocating its weights."""
    config = load_config("svd-xt").encoders
    semantic, geometric = build_encoders(config, device="meta")
    for encoder in (semantic, geometric):
        assert {p.device.type for p in encoder.parameters()} == {"meta"}

    tokens = semantic(torch.zeros(2, 3, 256, 256, dtype=torch.uint8))
    assert tokens.shape == (2, 256, 768) and tokens.device.type == "meta"
    assert (semantic.num_tokens, semantic.out_dim) == (256, 768)

    # DA3's RoPE reads position values (.item()), so its forward cannot run on meta tensors;
    # the small preset's forward above checks that out_dim/num_tokens describe real outputs.
    assert (geometric.num_tokens, geometric.out_dim) == (256, 2048)
    assert geometric.block == 11  # da3-large's first out-layer
    assert geometric.head.norm.normalized_shape == (geometric.out_dim,)  # what DA3's head reads


def test_build_encoders_uses_every_config_key(geometric):
    config = EncodersConfig(semantic_image_size=SMALL, geometric_image_size=SMALL)
    config = replace(config, geometric_layer=2, geometric_camera_token=True, init_seed=1)
    semantic, layer2 = build_encoders(config)
    assert (semantic.seed, layer2.seed) == (1, 1)
    assert layer2.block == geometric.backbone.out_layers[2] and layer2.num_tokens == 5
