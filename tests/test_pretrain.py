"""`svam pretrain-encoders`: a geometric encoder trained on the simulator's depth, loaded through
the path real Depth Anything 3 weights take."""

from __future__ import annotations

import itertools

import pytest

from svam.cli import main
from svam.config import load_config
from svam.data.episodes import clip_loader
from svam.teachers.encoders import EncoderWeightsError, GeometricEncoder
from svam.teachers.pretrain import PretrainError, abs_rel, frame_batches, pretrain_encoders

SIZE = 28  # 2 x 2 patch tokens: the architecture at its smallest


@pytest.fixture(scope="module")
def pretrained(collected, tmp_path_factory):
    config, episodes = collected
    out = tmp_path_factory.mktemp("encoders") / "geometric"
    config = load_config(
        "tiny",
        [
            f"run.root={out.parent}",
            f"pretrain_encoders.episodes={episodes}",
            f"encoders.geometric_image_size={SIZE}",
            "pretrain_encoders.steps=60",
            "pretrain_encoders.batch_size=8",
            "pretrain_encoders.lr_warmup_steps=4",
            "pretrain_encoders.eval_every=60",
            "pretrain_encoders.checkpoint_every=30",
            "pretrain_encoders.val_frames=8",
            "data.val_fraction=0.4",  # 2 episodes per task: one trains, one is held out
            "data.test_fraction=0.0",
        ],
    )
    return config, episodes, pretrain_encoders(config, out)


def test_pretrained_depth_head_beats_random_init_on_held_out_frames(pretrained):
    config, episodes, out = pretrained
    held_out = list(
        itertools.islice(
            frame_batches(clip_loader(episodes, config.data, "val", shuffle=False), 16), 2
        )
    )

    def error(encoder: GeometricEncoder) -> float:
        values = [
            float(abs_rel(encoder.depth(b["frames"][:, None])[:, 0], b["depth"], 10.0))
            for b in held_out
        ]
        return sum(values) / len(values)

    random_init = error(GeometricEncoder("da3-small", SIZE))
    trained = error(GeometricEncoder("da3-small", SIZE, weights=out))  # the real loading path
    assert trained < 0.8 * random_init, (trained, random_init)


def test_pretrained_weights_load_as_real_ones_and_a_wrong_architecture_is_refused(
    pretrained, capsys
):
    config, _, out = pretrained
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}  # DA3's layout
    encoder = GeometricEncoder("da3-small", SIZE, weights=out)
    assert encoder.fingerprint != GeometricEncoder("da3-small", SIZE).fingerprint
    with pytest.raises(
        EncoderWeightsError,
        match="holds a da3-small model but encoders.geometric_model is da3-base",
    ):
        GeometricEncoder("da3-base", SIZE, weights=out)
    # given weights: nothing to pretrain, one line
    code = main(
        ["pretrain-encoders", f"run.root={out.parent}", f"encoders.geometric_weights={out}"]
    )
    assert code == 1
    assert "weights are given, so there is nothing to pretrain" in capsys.readouterr().err
    with pytest.raises(PretrainError):
        config.encoders.geometric_weights = str(out)
        pretrain_encoders(config)
