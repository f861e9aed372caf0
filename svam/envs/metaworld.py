"""Meta-World v3 for svam: task instructions, one seeded task rendered as upright RGB-D, experts.

Rendering is software OpenGL through EGL on machines without a GPU, so it dominates the cost of an
episode; see `_RgbdRenderer` for what keeps it cheap.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
# Mesa's software rasteriser (llvmpipe) renders with one thread per core by default; at svam's image
# sizes that buys nothing and fights parallel collect workers for the cores (scripts/bench_collect.py,
# 24 tiny episodes: 1 worker 12.0 s either way; 2 workers 12.5 s with it, 6.7 s without).
os.environ.setdefault("LP_NUM_THREADS", "1")

try:
    # Mesa's software renderer loads its own LLVM; loading triton's LLVM (which torch's CUDA build
    # ships and diffusers imports) after that segfaults. Loaded first, both live side by side, so
    # a policy, a teacher and the simulator can share one process.
    import triton  # noqa: F401
except ImportError:
    pass

import atexit
import difflib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import gymnasium as gym
import metaworld  # noqa: F401  (registers the "Meta-World/..." gymnasium ids)
import mujoco
import numpy as np
from metaworld.policies import ENV_POLICY_MAP
from metaworld.sawyer_xyz_env import SawyerXYZEnv

TASK_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "pick the puck from one bin and place it into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "reach past the wall and press the button from the top",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "reach past the wall and press the button from the front",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the nut up off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock down",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet handle to open the faucet",
    "faucet-close-v3": "turn the faucet handle to close the faucet",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "pick up the peg and insert it sideways into the hole",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "reach-v3": "reach the red goal position",
    "push-back-v3": "pull the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "soccer-v3": "kick the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and push the thermos with it",
    "stick-pull-v3": "grasp the stick and pull the thermos with it",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
"""A natural-language instruction for each Meta-World MT50 task, keyed by the task's env name."""

CAMERAS: tuple[str, ...] = (
    "corner",
    "corner2",
    "corner3",
    "corner4",
    "topview",
    "behindGripper",
    "gripperPOV",
)
"""The cameras every Meta-World v3 scene defines."""

# Meta-World's scene (robot, table, 8x8 m floor) lies within ~7 m of every camera, while MuJoCo
# draws the skybox tens of metres away; farther than this, a pixel sees no geometry.
_SKYBOX_MIN_DEPTH_M = 20.0


def _unknown_name_error(kind: str, name: str, known: Iterable[str], config_key: str) -> ValueError:
    known = sorted(known, key=str.lower)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return ValueError(
        f"unknown Meta-World {kind} '{name}' (config key {config_key}){hint} "
        f"Known {kind}s: {', '.join(known)}"
    )


def check_tasks(names: Iterable[str], config_key: str = "collect.tasks") -> None:
    """Raise a one-line `ValueError` naming the first unknown task and the closest known one."""
    names = list(names)
    if not names:
        raise ValueError(f"no Meta-World task given (config key {config_key})")
    for name in names:
        if name not in TASK_INSTRUCTIONS:
            raise _unknown_name_error("task", name, TASK_INSTRUCTIONS, config_key)


def check_camera(name: str, config_key: str = "collect.camera") -> None:
    """Raise a one-line `ValueError` if `name` is not a Meta-World camera."""
    if name not in CAMERAS:
        raise _unknown_name_error("camera", name, CAMERAS, config_key)


def _roll_upside_down_cameras(model: mujoco.MjModel, data: mujoco.MjData) -> None:
    """Turn every camera whose image 'up' points at the floor by 180 degrees about its view axis.

    Meta-World's corner cameras are defined that way and render upside down. Turning the camera,
    rather than flipping pixels, gives a true (unmirrored) view and keeps `data.cam_xmat`
    consistent with the image.
    """
    mujoco.mj_kinematics(model, data)
    half_turn = np.array([0.0, 0.0, 0.0, 1.0])  # quaternion (w, x, y, z) of 180 deg about z
    for camera in range(model.ncam):
        image_up = data.cam_xmat[camera].reshape(3, 3)[:, 1]
        if image_up[2] < 0:
            mujoco.mju_mulQuat(model.cam_quat[camera], model.cam_quat[camera].copy(), half_turn)
            # Tracking cameras keep their initial world orientation, cam_mat0, instead.
            model.cam_mat0[camera] = (model.cam_mat0[camera].reshape(3, 3) * [-1, -1, 1]).ravel()
    mujoco.mj_kinematics(model, data)


_thread_local = threading.local()

_IDLE_RENDERERS = 4
"""Renderers no env uses that a thread keeps for the next env of their task (~40 MB each)."""


def _gl_context_class() -> type:
    """The GL context class that MUJOCO_GL names.

    mujoco fixes `mujoco.GLContext` when first imported. If that happened before this module set
    MUJOCO_GL (importing metaworld first does it), it chose GLFW, which needs a display.
    """
    if os.environ["MUJOCO_GL"] == "egl":
        from mujoco.egl import GLContext

        return GLContext
    return mujoco.GLContext


def _gl_context():
    """This thread's OpenGL context, shared by all renderers.

    A fresh context costs ~150 ms on a software renderer (its shaders are compiled again), a
    quarter of a short episode. MuJoCo draws into its own offscreen framebuffer, so one context
    serves every image size.
    """
    context = getattr(_thread_local, "gl_context", None)
    if context is None:
        context = _thread_local.gl_context = _gl_context_class()(64, 64)
        # Free it before EGL itself is torn down at exit, which would otherwise report errors.
        atexit.register(context.free)
    return context


def _prepare_for_rendering(model: mujoco.MjModel, size: int) -> None:
    """What `_RgbdRenderer` needs of a model: on a software renderer, multisampling, shadows and
    reflections are what cost, so they are switched off; the offscreen buffer is `size` square."""
    model.vis.quality.offsamples = 0
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0
    model.vis.global_.offwidth = model.vis.global_.offheight = size


class _RgbdRenderer:
    """Colour and metric depth of any camera of one task's scene from a single offscreen pass.

    `mujoco.Renderer` renders the scene twice for colour and depth; reading both buffers of one
    pass costs little more than colour alone. What it holds (MuJoCo's render context: meshes,
    textures, ~40 MB and ~0.17 s to make on a software renderer; the scene) depends only on the
    task's model as compiled and the image size, so every env of a task in a thread shares one
    (`_Renderers`) and passes its own model, data and camera to `render`.
    """

    def __init__(self, model: mujoco.MjModel, size: int):
        _prepare_for_rendering(model, size)
        self._gl = _gl_context()
        self._gl.make_current()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._context.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR  # 1 at near, 0 at far
        self._scene = mujoco.MjvScene(model, maxgeom=10_000)
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._viewport = mujoco.MjrRect(0, 0, size, size)
        self._rgb = np.empty((size, size, 3), np.uint8)
        self._zbuffer = np.empty((size, size), np.float32)
        self.near = model.vis.map.znear * model.stat.extent
        self.far = model.vis.map.zfar * model.stat.extent

    def render(
        self, model: mujoco.MjModel, data: mujoco.MjData, camera: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Colour and depth of fixed camera `camera` of `model` (this task's) in state `data`."""
        self._gl.make_current()
        # Renderers share the thread's GL context; MuJoCo draws into whichever framebuffer is
        # bound, so bind this one's again: otherwise, after another renderer has drawn, this
        # one reads back its own stale image (several envs run in lockstep in one process).
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._camera.fixedcamid = camera
        mujoco.mjv_updateScene(
            model,
            data,
            self._option,
            None,
            self._camera,
            mujoco.mjtCatBit.mjCAT_ALL,
            self._scene,
        )
        mujoco.mjr_render(self._viewport, self._scene, self._context)
        mujoco.mjr_readPixels(self._rgb, self._zbuffer, self._viewport, self._context)
        # OpenGL returns the bottom row first.
        rgb = self._rgb[::-1].copy()
        z = self._zbuffer[::-1].astype(np.float64)
        depth = self.near * self.far / (self.near + z * (self.far - self.near))
        depth[depth > _SKYBOX_MIN_DEPTH_M] = self.far  # as mujoco.Renderer reports the background
        return rgb, depth.astype(np.float32)

    def free(self) -> None:
        self._gl.make_current()
        self._context.free()


class _Renderers:
    """A thread's renderers by (task, image size), shared by its envs of that task and size.

    One no env uses any more is kept for a later env (a collect worker's next episode, say) while
    it is among the last `_IDLE_RENDERERS` unused ones; older ones are freed.
    """

    def __init__(self):
        self._renderers: dict[tuple[str, int], list] = {}  # key -> [renderer, envs using it]
        self._idle: OrderedDict[tuple[str, int], None] = OrderedDict()  # least recent first

    @staticmethod
    def of_this_thread() -> _Renderers:
        renderers = getattr(_thread_local, "renderers", None)
        if renderers is None:
            _gl_context()
            renderers = _thread_local.renderers = _Renderers()
            # Registered after the GL context's `free`, so it runs before it.
            atexit.register(renderers.free)
        return renderers

    def acquire(self, task: str, model: mujoco.MjModel, size: int) -> _RgbdRenderer:
        """The renderer of `task` at `size`, made from `model` (one of the task's) if need be."""
        key = (task, size)
        entry = self._renderers.get(key)
        if entry is None:
            entry = self._renderers[key] = [_RgbdRenderer(model, size), 0]
        self._idle.pop(key, None)
        entry[1] += 1
        return entry[0]

    def release(self, task: str, size: int) -> None:
        key = (task, size)
        entry = self._renderers.get(key)
        if entry is None:  # freed at exit already
            return
        entry[1] -= 1
        if entry[1] == 0:
            self._idle[key] = None
            while len(self._idle) > _IDLE_RENDERERS:
                oldest, _ = self._idle.popitem(last=False)
                self._renderers.pop(oldest)[0].free()

    def free(self) -> None:
        for renderer, _ in self._renderers.values():
            renderer.free()
        self._renderers.clear()
        self._idle.clear()


class MetaWorldEnv:
    """One Meta-World v3 task at the variation (object and goal positions) that `seed` picks.

    Every `reset` returns to that same variation; `reseed` moves the env to another one, as if
    made anew at that seed, without building the model again. Observations are Meta-World's 39-d
    vectors with the goal visible; images come from one named camera, upright, `image_size`
    pixels square. Use it as a context manager, or call `close`, to hand back its renderer.
    """

    def __init__(self, task: str, seed: int, camera: str = "corner", image_size: int = 64):
        check_tasks([task])
        check_camera(camera)
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.task = task
        self.seed = seed
        self.camera = camera
        self.image_size = image_size
        self._env = gym.make(
            "Meta-World/goal_observable", env_name=task, seed=seed, disable_env_checker=True
        )
        self._sim = self._env.unwrapped
        _roll_upside_down_cameras(self._sim.model, self._sim.data)
        self._camera_id = self._sim.model.camera(camera).id
        self._renderer: _RgbdRenderer | None = None
        self._renderers: _Renderers | None = None

    def reseed(self, seed: int) -> None:
        """Make this env the variation `seed` picks, exactly as `MetaWorldEnv(task, seed, ...)`
        builds it (same observations, frames and rewards from `reset` on); call `reset` next.

        Costs one Meta-World reset (~15 ms) instead of compiling the task's model (~0.17 s).
        Meta-World's goal-observable constructor seeds numpy's global generator with `seed`,
        resets once with the variation unfrozen (drawing it from that generator), freezes it
        and seeds the env's own generators: this repeats those steps on the built env. A reset
        starts from `mj_resetData` and sets every task attribute again, so the previous
        episode leaves nothing behind (tests/test_envs.py compares with fresh envs).
        """
        sim = self._sim
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            sim._freeze_rand_vec = False
            sim.reset()
            sim._freeze_rand_vec = True
            sim.seed(seed)
        finally:
            np.random.set_state(state)
        # What SawyerXYZEnv.__init__ sets and a reset does not.
        sim._did_see_sim_exception = False
        sim._last_stable_obs = None
        self.seed = seed

    @property
    def sim(self) -> SawyerXYZEnv:
        """The unwrapped Meta-World env, with its MuJoCo `model` and `data`."""
        return self._sim

    @property
    def instruction(self) -> str:
        return TASK_INSTRUCTIONS[self.task]

    @property
    def action_dim(self) -> int:
        return self._env.action_space.shape[0]

    @property
    def max_episode_steps(self) -> int:
        return self._sim.max_path_length

    def reset(self) -> np.ndarray:
        obs, _ = self._env.reset()
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """Apply `action` (clipped to the action space); returns (obs, reward, success)."""
        obs, reward, _, _, info = self._env.step(self.clip_action(action))
        return obs, float(reward), bool(info["success"])

    def clip_action(self, action: np.ndarray) -> np.ndarray:
        space = self._env.action_space
        return np.clip(action, space.low, space.high).astype(np.float32)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """Upright RGB (H, W, 3) uint8 and depth (H, W) float32 in metres along the view axis.

        Pixels that see no geometry read the far clipping plane's distance.
        """
        model = self._sim.model
        if self._renderer is None:
            _prepare_for_rendering(model, self.image_size)
            self._renderers = _Renderers.of_this_thread()
            self._renderer = self._renderers.acquire(self.task, model, self.image_size)
        return self._renderer.render(model, self._sim.data, self._camera_id)

    @staticmethod
    def proprio(obs: np.ndarray) -> np.ndarray:
        """Hand position (xyz) and gripper opening in [0, 1]: the first 4 entries of an observation."""
        return np.asarray(obs[:4], dtype=np.float32)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderers.release(self.task, self.image_size)
            self._renderer = self._renderers = None
        self._env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ExpertEpisode:
    """A scripted-expert episode; step i pairs the frame seen before action i with that action."""

    task: str
    seed: int
    instruction: str
    frames: np.ndarray  # (L, H, W, 3) uint8
    depth: np.ndarray  # (L, H, W) float16, metres
    actions: np.ndarray  # (L, 4) float32, clipped to the action space
    state: np.ndarray  # (L, 4) float32, hand xyz and gripper opening (`MetaWorldEnv.proprio`)
    success: bool
    first_success_step: int
    """Index of the action after which the task first succeeded; -1 if it never did."""
    camera: str
    image_size: int


def rollout_expert(
    task: str,
    seed: int,
    camera: str = "corner",
    image_size: int = 64,
    max_steps: int = 150,
    steps_after_success: int = 5,
) -> ExpertEpisode:
    """Run Meta-World's scripted expert for `task` at `seed` and record it.

    Stops after `max_steps` steps, or `steps_after_success` steps after the first success. The
    same arguments always give byte-identical arrays.
    """
    frames, depths, actions, states = [], [], [], []
    first_success_step = -1
    with MetaWorldEnv(task, seed, camera, image_size) as env, warnings.catch_warnings():
        # The experts warn on most steps that their gains exceed the action range; we clip.
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
        if not 1 <= max_steps <= env.max_episode_steps:
            raise ValueError(
                f"max_steps must be in [1, {env.max_episode_steps}] for Meta-World, got {max_steps}"
            )
        policy = ENV_POLICY_MAP[task]()
        obs = env.reset()
        for step in range(max_steps):
            rgb, depth = env.render()
            action = env.clip_action(policy.get_action(obs))
            frames.append(rgb)
            depths.append(depth.astype(np.float16))
            actions.append(action)
            states.append(env.proprio(obs))
            obs, _, success = env.step(action)
            if success and first_success_step < 0:
                first_success_step = step
            if first_success_step >= 0 and step - first_success_step >= steps_after_success:
                break
    return ExpertEpisode(
        task=task,
        seed=seed,
        instruction=TASK_INSTRUCTIONS[task],
        frames=np.stack(frames),
        depth=np.stack(depths),
        actions=np.stack(actions),
        state=np.stack(states),
        success=first_success_step >= 0,
        first_success_step=first_success_step,
        camera=camera,
        image_size=image_size,
    )
