"""The one hashing helper and the one seeding helper every stage uses."""

from __future__ import annotations

import torch

from svam.hashing import SHORT, file_digest, json_digest, state_digest
from svam.seeding import derived_seed, keyed_generator


def test_json_digest_ignores_key_order_and_sees_every_value():
    assert json_digest({"a": 1, "b": [1, 2]}) == json_digest({"b": [1, 2], "a": 1})
    assert json_digest({"a": 1, "b": [1, 2]}) != json_digest({"a": 1, "b": [2, 1]})
    assert len(json_digest({})) == SHORT


def test_file_digest_covers_the_bytes_of_every_file_in_order(tmp_path):
    first, second, joined = tmp_path / "a", tmp_path / "b", tmp_path / "ab"
    first.write_bytes(b"x" * 3_000_000)
    second.write_bytes(b"y")
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    assert file_digest(first, second) == file_digest(joined) != file_digest(second, first)
    assert file_digest(first, chunk_size=7) == file_digest(first)


def test_state_digest_changes_with_any_weight_or_name():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    before = state_digest(layer)
    assert state_digest(layer) == before
    assert state_digest({"other": layer}) != before
    with torch.no_grad():
        layer.bias[0] += 1e-6
    assert state_digest(layer) != before


def test_derived_seeds_are_stable_and_independent():
    assert derived_seed(0, "train", 0, 5) == derived_seed(0, "train", 0, 5) < 2**63
    seeds = {
        derived_seed(seed, purpose, rank)
        for seed in range(3)
        for purpose in "ab"
        for rank in range(4)
    }
    assert len(seeds) == 3 * 2 * 4
    a, b = keyed_generator(1, "clip-7"), keyed_generator(1, "clip-7")
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    assert not torch.equal(
        torch.randn(4, generator=keyed_generator(1, "clip-7")),
        torch.randn(4, generator=keyed_generator(1, "clip-8")),
    )
