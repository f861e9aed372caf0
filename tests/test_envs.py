"""Meta-World wrapper: task names, seeded variations, upright metric RGB-D, scripted experts."""

import os
import subprocess
import sys

import mujoco
import numpy as np
import pytest
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT50_V3
from metaworld.policies import ENV_POLICY_MAP

from svam.envs import (
    CAMERAS,
    TASK_INSTRUCTIONS,
    MetaWorldEnv,
    check_camera,
    check_tasks,
    rollout_expert,
)

SIZE = 48


@pytest.fixture(scope="module")
def reach_env():
    with MetaWorldEnv("reach-v3", seed=0, image_size=SIZE) as env:
        env.reset()
        yield env


def test_instructions_cover_exactly_metaworld_mt50():
    assert set(TASK_INSTRUCTIONS) == set(MT50_V3)
    assert set(TASK_INSTRUCTIONS) <= set(ENV_POLICY_MAP)
    instructions = list(TASK_INSTRUCTIONS.values())
    assert all(instructions) and len(set(instructions)) == len(instructions)


def test_cameras_are_those_metaworld_defines():
    sim = ALL_V3_ENVIRONMENTS["reach-v3"]()
    try:
        assert {sim.model.camera(i).name for i in range(sim.model.ncam)} == set(CAMERAS)
    finally:
        sim.close()


def test_unknown_task_names_config_key_and_closest_task():
    check_tasks(["reach-v3", "pick-place-v3"])
    with pytest.raises(ValueError) as error:
        check_tasks(["reach-v3", "pick-plase-v3"])
    message = str(error.value)
    assert "\n" not in message
    assert "'pick-plase-v3'" in message and "collect.tasks" in message
    assert "did you mean 'pick-place-v3'?" in message
    assert "drawer-close-v3" in message  # the known tasks are listed
    with pytest.raises(ValueError, match="did you mean 'reach-v3'"):
        MetaWorldEnv("reach-v2", seed=0)


def test_unknown_camera_names_config_key_and_valid_cameras():
    for camera in CAMERAS:
        check_camera(camera)
    with pytest.raises(ValueError) as error:
        MetaWorldEnv("reach-v3", seed=0, camera="cornr")
    message = str(error.value)
    assert "\n" not in message
    assert "'cornr'" in message and "collect.camera" in message
    assert all(camera in message for camera in CAMERAS)


def test_seed_fixes_the_variation(reach_env):
    first = reach_env.reset()
    assert first.shape == (39,)
    np.testing.assert_array_equal(reach_env.reset(), first)
    with MetaWorldEnv("reach-v3", seed=0) as same, MetaWorldEnv("reach-v3", seed=1) as other:
        np.testing.assert_array_equal(same.reset(), first)
        goal = slice(36, 39)
        assert not np.allclose(other.reset()[goal], first[goal])


def test_step_and_proprio(reach_env):
    obs = reach_env.reset()
    state = reach_env.proprio(obs)
    assert state.dtype == np.float32 and state.shape == (4,)
    np.testing.assert_allclose(state[:3], reach_env.sim.get_endeff_pos(), atol=1e-6)
    next_obs, reward, success = reach_env.step(np.array([0.0, 0.0, 5.0, 0.0]))  # clipped to 1
    assert next_obs[2] > obs[2]
    assert isinstance(reward, float) and isinstance(success, bool)
    assert reach_env.action_dim == 4 and reach_env.max_episode_steps == 500
    assert reach_env.instruction == TASK_INSTRUCTIONS["reach-v3"]
    reach_env.reset()


def test_render_shapes_and_dtypes(reach_env):
    rgb, depth = reach_env.render()
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    assert depth.shape == (SIZE, SIZE) and depth.dtype == np.float32
    assert rgb.std() > 10  # a scene, not a blank buffer


def test_rgb_and_depth_match_mujoco_renderer(reach_env):
    """One render pass read twice equals mujoco.Renderer's separate colour and depth passes."""
    rgb, depth = reach_env.render()
    with mujoco.Renderer(reach_env.sim.model, SIZE, SIZE) as renderer:
        renderer.update_scene(reach_env.sim.data, camera="corner")
        np.testing.assert_array_equal(rgb, renderer.render())
        renderer.enable_depth_rendering()
        renderer.update_scene(reach_env.sim.data, camera="corner")
        np.testing.assert_allclose(depth, renderer.render(), rtol=1e-4)


def test_depth_is_plausible_metres(reach_env):
    _, depth = reach_env.render()
    assert np.isfinite(depth).all() and (depth > 0).all()
    far = reach_env.sim.model.vis.map.zfar * reach_env.sim.model.stat.extent
    scene = depth[depth < far]
    assert scene.size > depth.size // 2
    assert 0.3 < scene.min() and scene.max() < 8.0
    assert 0.5 < np.median(scene) < 3.0  # the table is about a metre or two from the camera
    assert scene.std() > 0.05


@pytest.mark.parametrize("camera", ["corner", "corner2", "corner3", "corner4"])
def test_corner_cameras_render_upright(camera):
    """Looking down at a table, the top of an upright image is farther away than its bottom."""
    with MetaWorldEnv("reach-v3", seed=0, camera=camera, image_size=32) as env:
        env.reset()
        _, depth = env.render()
        image_up = env.sim.data.cam_xmat[env.sim.model.camera(camera).id].reshape(3, 3)[:, 1]
    assert image_up[2] > 0
    assert np.median(depth[:8]) > np.median(depth[-8:])


@pytest.mark.parametrize("task", ["reach-v3", "button-press-topdown-v3"])
def test_expert_succeeds_and_is_recorded_step_by_step(task):
    episode = rollout_expert(task, seed=0, image_size=32, max_steps=150, steps_after_success=3)
    assert episode.success and 0 <= episode.first_success_step < 150
    length = episode.first_success_step + 3 + 1
    assert episode.frames.shape == (length, 32, 32, 3) and episode.frames.dtype == np.uint8
    assert episode.depth.shape == (length, 32, 32) and episode.depth.dtype == np.float16
    assert episode.actions.shape == (length, 4) and episode.actions.dtype == np.float32
    assert episode.state.shape == (length, 4) and episode.state.dtype == np.float32
    assert np.abs(episode.actions).max() <= 1.0
    assert episode.instruction == TASK_INSTRUCTIONS[task]
    with MetaWorldEnv(task, seed=0, image_size=32) as env:
        obs = env.reset()
        rgb, _ = env.render()
    np.testing.assert_array_equal(episode.frames[0], rgb)  # frame i is seen before action i
    np.testing.assert_array_equal(episode.state[0], env.proprio(obs))
    assert not np.array_equal(episode.frames[0], episode.frames[-1])


def test_rollout_is_deterministic():
    runs = [rollout_expert("push-v3", seed=3, image_size=24, max_steps=30) for _ in range(2)]
    for field in ("frames", "depth", "actions", "state"):
        first, second = (getattr(run, field) for run in runs)
        assert first.dtype == second.dtype
        assert first.tobytes() == second.tobytes(), field


def test_rollout_rejects_more_steps_than_metaworld_allows():
    with pytest.raises(ValueError, match="max_steps"):
        rollout_expert("reach-v3", seed=0, max_steps=501)


def test_renders_headless_when_mujoco_was_imported_first():
    """Importing metaworld before svam makes mujoco default to GLFW, which needs a display."""
    script = (
        "import metaworld, mujoco\n"
        "from svam.envs import MetaWorldEnv\n"
        "with MetaWorldEnv('reach-v3', seed=0, image_size=16) as env:\n"
        "    env.reset()\n"
        "    assert env.render()[0].std() > 0\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY")}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)


def test_rendering_then_loading_the_models_shares_one_process():
    """Mesa's LLVM and triton's clash unless triton comes first: a policy and the simulator share
    a process in evaluation, so rendering and then importing diffusers must not crash."""
    code = (
        "from svam.envs.metaworld import rollout_expert\n"
        "rollout_expert('reach-v3', 0, image_size=16, max_steps=3)\n"
        "import diffusers.models\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-500:]


def _episode(env: MetaWorldEnv) -> list[np.ndarray]:
    """Reset observation, then RGB, depth and observation, reward and success of 4 fixed actions."""
    actions = np.array([[0.5, 0.2, -0.3, 0.1], [-1.0, 0.4, 0.8, -1.0], [0.0, -0.7, -0.2, 1.0]] * 2)
    out = [env.reset()]
    for action in actions[:4]:
        out += [*env.render(), *env.step(action)]
    return [np.asarray(x) for x in [*out, *env.render()]]


@pytest.mark.parametrize("task", ["reach-v3", "button-press-topdown-v3"])
def test_reseeded_env_is_a_fresh_env_at_that_seed(task):
    """Observations, frames, depth and rewards after `reseed(s)`, even following an episode at
    another seed, are byte for byte those of `MetaWorldEnv(task, s)`."""
    with MetaWorldEnv(task, seed=4, image_size=24) as fresh:
        want = _episode(fresh)
    with MetaWorldEnv(task, seed=9, image_size=24) as reused:
        other = _episode(reused)
        reused.reseed(4)
        assert reused.seed == 4
        got = _episode(reused)
        reused.reseed(9)
        again = _episode(reused)
    assert not np.array_equal(other[0], want[0])  # another variation
    for a, b in [*zip(want, got, strict=True), *zip(other, again, strict=True)]:
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_envs_of_a_task_share_one_renderer_and_keep_it_for_the_next():
    with (
        MetaWorldEnv("reach-v3", 0, image_size=20) as a,
        MetaWorldEnv("reach-v3", 1, "corner2", 20) as b,
    ):
        a.reset(), b.reset()
        a.render(), b.render()
        renderer = a._renderer
        assert b._renderer is renderer
    with MetaWorldEnv("reach-v3", 2, image_size=20) as c:
        c.reset()
        c.render()
        assert c._renderer is renderer  # kept while unused
