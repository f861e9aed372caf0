"""LeRobot v2.1 datasets written the way lerobot writes them, with pyarrow and PyAV directly
(never with svam's exporter), so an import is checked against an independent writer."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only

CAMERAS = ("observation.images.top", "observation.images.wrist")
IMAGE_CAMERA = "observation.images.gripper"
"""An `image` feature: PNG bytes in the parquet rows (lerobot's struct<bytes, path>)."""
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def episode_frames(episode: int, length: int, height: int, width: int, camera: int) -> np.ndarray:
    """Smooth frames whose colour encodes (episode, step, camera): they survive a lossy codec."""
    steps, y, x = np.meshgrid(
        np.arange(length), np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij"
    )
    red = 40 + 150 * x + 2 * steps
    green = 30 + 120 * y + 20 * episode
    blue = np.full_like(red, 60 + 100 * camera)
    return np.clip(np.stack([red, green, blue], -1), 0, 255).astype(np.uint8)


def write_v21_dataset(
    root: Path,
    lengths=(12, 9, 15),
    tasks=("pick up the cube", "open the drawer"),
    fps: int = 10,
    height: int = 48,
    width: int = 64,
    state_dim: int = 6,
    action_dim: int = 7,
) -> dict:
    """A v2.1 dataset of len(lengths) episodes (episode i does task i % len(tasks)) with two
    cameras; returns what it holds: {episode: {"state", "action", "task", "frames": {camera}}}."""
    root = Path(root)
    truth = {}
    features = {
        camera: {
            "dtype": "video",
            "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
            "info": {
                "video.fps": float(fps),
                "video.height": height,
                "video.width": width,
                "video.channels": 3,
                "video.codec": "av1",
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "has_audio": False,
            },
        }
        for camera in CAMERAS
    }
    features[IMAGE_CAMERA] = {
        "dtype": "image",
        "shape": [height, width, 3],
        "names": ["height", "width", "channels"],
    }
    features["observation.state"] = {"dtype": "float32", "shape": [state_dim], "names": None}
    features["action"] = {"dtype": "float32", "shape": [action_dim], "names": None}
    for name, dtype in (
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    rng = np.random.default_rng(0)
    index = 0
    episodes_meta = []
    for episode, length in enumerate(lengths):
        task_index = episode % len(tasks)
        state = rng.normal(size=(length, state_dim)).astype(np.float32)
        action = rng.normal(size=(length, action_dim)).astype(np.float32)
        images = episode_frames(episode, length, height, width, 2)
        png = [
            cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
            for image in images
        ]
        table = pa.table(
            {
                IMAGE_CAMERA: pa.array(
                    [{"bytes": data, "path": None} for data in png],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                ),
                "observation.state": pa.FixedSizeListArray.from_arrays(state.ravel(), state_dim),
                "action": pa.FixedSizeListArray.from_arrays(action.ravel(), action_dim),
                "timestamp": pa.array(np.arange(length, dtype=np.float32) / fps),
                "frame_index": pa.array(np.arange(length, dtype=np.int64)),
                "episode_index": pa.array(np.full(length, episode, np.int64)),
                "index": pa.array(np.arange(index, index + length, dtype=np.int64)),
                "task_index": pa.array(np.full(length, task_index, np.int64)),
            }
        )
        paths = {"episode_chunk": 0, "episode_index": episode}
        data_path = root / DATA_PATH.format(**paths)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, data_path)
        frames = {IMAGE_CAMERA: images}
        for number, camera in enumerate(CAMERAS):
            frames[camera] = episode_frames(episode, length, height, width, number)
            video_path = root / VIDEO_PATH.format(video_key=camera, **paths)
            video_path.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(video_path), "w") as container:
                stream = container.add_stream(
                    "libsvtav1", rate=fps, options={"g": "2", "crf": "20", "preset": "12"}
                )
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for step, image in enumerate(frames[camera]):
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts, frame.time_base = step, Fraction(1, fps)
                    container.mux(stream.encode(frame))
                container.mux(stream.encode(None))
        truth[episode] = {
            "state": state,
            "action": action,
            "task": tasks[task_index],
            "frames": frames,
        }
        episodes_meta.append(
            {"episode_index": episode, "tasks": [tasks[task_index]], "length": length}
        )
        index += length
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes_meta))
    (meta / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
    )
    info = {
        "codebase_version": "v2.1",
        "robot_type": "so100",
        "total_episodes": len(lengths),
        "total_frames": index,
        "total_tasks": len(tasks),
        "total_videos": len(lengths) * len(CAMERAS),
        "total_chunks": 1,
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "features": features,
    }
    (meta / "info.json").write_text(json.dumps(info, indent=4))
    return truth
