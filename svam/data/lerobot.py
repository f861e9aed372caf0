"""LeRobot datasets on disk: read v2.x and v3.0 episodes, write v3.0.

The layout (lerobot's `datasets/utils.py` and `dataset_metadata.py`): `meta/info.json` names the
`codebase_version`, the frame rate, the path templates and the `features`; frames of a `video`
feature live in mp4 files, everything else in parquet rows (one row per frame: the features,
`timestamp` in seconds from the episode's start, `frame_index`, `episode_index`, global `index`,
`task_index`).

- v2.0 / v2.1: one parquet and one mp4 per camera per episode (`episode_chunk` =
  episode_index // chunks_size in the templates), `meta/episodes.jsonl`, `meta/tasks.jsonl`.
- v3.0: many episodes per file, `meta/episodes/chunk-*/file-*.parquet` (one row per episode: its
  data file, its frame range and, per camera, its video file and `from_timestamp` there),
  `meta/tasks.parquet` (task_index, task), `meta/stats.json`.

A frame's video time is `from_timestamp + timestamp` (0 + timestamp in v2), matched within
lerobot's own tolerance (1e-4 s). svam adds `svam/*` columns to the episodes metadata it exports
(its task name, seed, success), which lerobot ignores and an import reads back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from svam.data.video import VideoWriter, decode_frames, resize_rgb

INFO_PATH = "meta/info.json"
V2_VERSIONS = ("v2.0", "v2.1")
V3_VERSION = "v3.0"
TOLERANCE_S = 1e-4
"""lerobot's `tolerance_s` default: how far a decoded frame's time may be from the one asked."""
CAMERA_DTYPES = ("video", "image")
DEFAULT_FEATURES = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}
SVAM_COLUMNS = ("svam/task", "svam/seed", "svam/success", "svam/first_success_step")
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
CHUNKS_SIZE = 1000
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)


class LeRobotFormatError(ValueError):
    """A LeRobot dataset svam cannot read; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class EpisodeRef:
    """Where one episode's rows and frames are."""

    index: int
    length: int
    data_path: Path
    video_path: Path | None
    """The camera's mp4 (None for an `image` feature, whose frames are in the rows)."""
    video_from_s: float
    svam: dict[str, Any] = field(default_factory=dict)
    """What svam's exporter recorded (task, seed, success, first_success_step), if it did."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LeRobotFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeRobotFormatError(f"{path}: not valid JSON ({exc})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise LeRobotFormatError(f"{path}: missing") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LeRobotFormatError(f"{path}:{number}: not valid JSON ({exc})") from None
    return rows


def _read_parquet(
    path: Path, columns: list[str] | None = None, filters=None, optional: tuple[str, ...] = ()
):
    """The table of `columns` (all when None), plus those of `optional` the file has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise LeRobotFormatError(f"{path}: missing")
    try:
        schema = pq.read_schema(path)
        absent = [c for c in columns or [] if c not in schema.names]
        if absent:
            raise LeRobotFormatError(
                f"{path}: no column '{absent[0]}' (its columns: {', '.join(schema.names)})"
            )
        if columns is not None:
            columns = columns + [c for c in optional if c in schema.names]
        return pq.read_table(path, columns=columns, filters=filters)
    except (pa.ArrowException, OSError) as exc:
        raise LeRobotFormatError(f"{path}: unreadable parquet ({exc})") from None


def _column(table, name: str, rows: int) -> np.ndarray:
    """A feature column as (rows, dim) float32: fixed-size and variable lists, or scalars."""
    import pyarrow as pa

    column = table[name].combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.astype(np.float32).reshape(rows, -1)
    return column.to_numpy(zero_copy_only=False).astype(np.float32).reshape(rows, 1)


def task_slug(task: str) -> str:
    """A task string as an svam task name: lower case, words joined by '-', at most 40 chars."""
    return re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")[:40].strip("-") or "task"


@dataclass
class LeRobotSource:
    """A LeRobot dataset directory, opened for import: its metadata checked, episodes located."""

    root: Path
    info: dict[str, Any]
    camera: str
    state: str | None
    action: str
    tasks: dict[int, str]
    episodes: list[EpisodeRef]

    @property
    def version(self) -> str:
        return self.info["codebase_version"]

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def camera_dtype(self) -> str:
        return self.info["features"][self.camera]["dtype"]

    @classmethod
    def open(
        cls, root: str | Path, camera: str | None, state: str | None, action: str
    ) -> LeRobotSource:
        root = Path(root)
        if not root.is_dir():
            raise LeRobotFormatError(f"{root}: not a directory")
        info_path = root / INFO_PATH
        if not info_path.is_file():
            raise LeRobotFormatError(
                f"{root}: no {INFO_PATH}, so not a LeRobot dataset (lerobot writes one in every "
                "dataset's root)"
            )
        info = _read_json(info_path)
        version = info.get("codebase_version") if isinstance(info, dict) else None
        if version not in (*V2_VERSIONS, V3_VERSION):
            raise LeRobotFormatError(
                f"{info_path}: codebase_version {version!r} is not one svam reads "
                f"({', '.join((*V2_VERSIONS, V3_VERSION))})"
            )
        for key in ("fps", "features", "data_path"):
            if key not in info:
                raise LeRobotFormatError(f"{info_path}: no '{key}'")
        features = info["features"]
        cameras = [k for k, f in features.items() if f.get("dtype") in CAMERA_DTYPES]
        if camera is None:
            if not cameras:
                raise LeRobotFormatError(
                    f"{info_path}: no video or image feature to take frames from (its features: "
                    f"{', '.join(features)})"
                )
            camera = cameras[0]
        for role, name in (("camera", camera), ("state", state), ("action", action)):
            if name is not None and name not in features:
                raise LeRobotFormatError(
                    f"{info_path}: feature '{name}' (lerobot.{role}) is not in the dataset; its "
                    f"features: {', '.join(features)}"
                )
        if camera not in cameras:
            raise LeRobotFormatError(
                f"{info_path}: feature '{camera}' (lerobot.camera) is a {features[camera]['dtype']}"
                f", not a camera; its cameras: {', '.join(cameras) or 'none'}"
            )
        if features[camera]["dtype"] == "video" and not info.get("video_path"):
            raise LeRobotFormatError(
                f"{info_path}: '{camera}' is a video but there is no video_path"
            )
        reader = _v3_episodes if version == V3_VERSION else _v2_episodes
        tasks, episodes = reader(
            root, info, camera if features[camera]["dtype"] == "video" else None
        )
        return cls(root, info, camera, state, action, tasks, episodes)

    def select(self, indices: list[int] | None) -> list[EpisodeRef]:
        """The episodes `indices` names (all when None), in dataset order."""
        if indices is None:
            return list(self.episodes)
        by_index = {ref.index: ref for ref in self.episodes}
        unknown = [i for i in indices if i not in by_index]
        if unknown:
            raise LeRobotFormatError(
                f"{self.root}: lerobot.episodes names episode {unknown[0]}, which the dataset "
                f"lacks (it holds {len(by_index)} episodes, indices {min(by_index)}..{max(by_index)})"
            )
        return [by_index[i] for i in sorted(set(indices))]

    def subsample_step(self, fps: float | None) -> int:
        """Rows kept: every `step`-th, so that the dataset's rate divided by it is `fps`."""
        if fps is None or fps == self.fps:
            return 1
        step = self.fps / fps
        if fps <= 0 or step < 1 or abs(step - round(step)) > 1e-6:
            raise LeRobotFormatError(
                f"lerobot.fps={fps}: {self.root / INFO_PATH} records {self.fps} fps, which is not a "
                "whole multiple of it (svam subsamples by keeping every k-th frame)"
            )
        return int(round(step))

    @cached_property
    def task_names(self) -> dict[int, str]:
        """An svam task name per task index: the task string's slug, made unique."""
        names, taken = {}, set()
        for index, task in sorted(self.tasks.items()):
            name = task_slug(task)
            if name in taken:
                name = f"{name}-{index}"
            names[index] = name
            taken.add(name)
        return names

    def read_episode(
        self, ref: EpisodeRef, size: int, step: int = 1
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One episode as svam episode arrays (frames (L, size, size, 3) uint8, actions, state)
        and metadata, keeping every `step`-th row; checks rows against the recorded length,
        timestamps increasing and every frame present."""
        columns = ["timestamp", "task_index", "episode_index", self.action]
        columns += [self.state] if self.state else []
        columns += [self.camera] if self.camera_dtype == "image" else []
        table = _read_parquet(ref.data_path, columns, filters=[("episode_index", "=", ref.index)])
        where = f"{ref.data_path}: episode {ref.index}"
        if table.num_rows != ref.length:
            raise LeRobotFormatError(
                f"{where} has {table.num_rows} data rows, but its metadata records {ref.length} "
                "frames"
            )
        if not table.num_rows:
            raise LeRobotFormatError(f"{where} has no frames")
        timestamps = table["timestamp"].to_numpy().astype(np.float64)
        backwards = np.flatnonzero(np.diff(timestamps) <= 0)
        if backwards.size:
            row = int(backwards[0]) + 1
            raise LeRobotFormatError(
                f"{where}: timestamp column is not increasing (row {row}: {timestamps[row]:.4f}s "
                f"after {timestamps[row - 1]:.4f}s)"
            )
        keep = np.arange(0, table.num_rows, step)
        actions = _column(table, self.action, table.num_rows)[keep]
        if self.state:
            state = _column(table, self.state, table.num_rows)[keep]
        else:
            state = np.zeros((len(keep), 0), np.float32)
        if self.camera_dtype == "video":
            frames = decode_frames(
                ref.video_path, ref.video_from_s + timestamps[keep], size, TOLERANCE_S
            )
        else:
            images = table[self.camera].combine_chunks().field("bytes").to_pylist()
            frames = np.stack([_decode_image(images[i], size, where) for i in keep])
        task_index = int(table["task_index"][0].as_py())
        if task_index not in self.tasks:
            raise LeRobotFormatError(f"{where}: task_index {task_index} is not in the tasks table")
        svam = ref.svam
        first_success = svam.get("first_success_step")
        meta = {
            "task": svam.get("task") or self.task_names[task_index],
            "instruction": self.tasks[task_index],
            "seed": int(svam["seed"]) if "seed" in svam else ref.index,
            "success": svam.get("success"),  # not recorded by lerobot
            "first_success_step": None if first_success is None else int(first_success) // step,
            "camera": self.camera,
        }
        return {"frames": frames, "actions": actions, "state": state}, meta

    def check_files(self, refs: Iterable[EpisodeRef]) -> None:
        """Every data and video file the episodes need is present, before anything is written."""
        for ref in refs:
            for path, what in ((ref.data_path, "data"), (ref.video_path, f"'{self.camera}' video")):
                if path is not None and not path.is_file():
                    raise LeRobotFormatError(
                        f"{path}: missing ({what} file of episode {ref.index})"
                    )


def _decode_image(data: bytes | None, size: int, where: str) -> np.ndarray:
    image = None if data is None else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise LeRobotFormatError(f"{where}: an image that does not decode")
    return resize_rgb(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), size)


def _v2_episodes(
    root: Path, info: dict, camera: str | None
) -> tuple[dict[int, str], list[EpisodeRef]]:
    tasks = {int(row["task_index"]): row["task"] for row in _read_jsonl(root / "meta/tasks.jsonl")}
    chunks = int(info.get("chunks_size", CHUNKS_SIZE))
    episodes = []
    for row in _read_jsonl(root / "meta/episodes.jsonl"):
        index = int(row["episode_index"])
        paths = {"episode_chunk": index // chunks, "episode_index": index}
        video = root / info["video_path"].format(video_key=camera, **paths) if camera else None
        episodes.append(
            EpisodeRef(
                index, int(row["length"]), root / info["data_path"].format(**paths), video, 0.0
            )
        )
    return tasks, episodes


def _v3_tasks(path: Path) -> dict[int, str]:
    """{task_index: task} from tasks.parquet, where lerobot writes the task strings as the pandas
    index: a column named `task`, or, unnamed, `__index_level_0__` (lerobot 0.4)."""
    table = _read_parquet(path)
    if "task_index" not in table.column_names:
        raise LeRobotFormatError(f"{path}: no column 'task_index'")
    pandas = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    names = ["task", *(c for c in pandas.get("index_columns", []) if isinstance(c, str))]
    column = next((name for name in names if name in table.column_names), None)
    if column is None:
        raise LeRobotFormatError(
            f"{path}: no task strings (no 'task' column or pandas index; its columns: "
            f"{', '.join(table.column_names)})"
        )
    return dict(zip(table["task_index"].to_pylist(), table[column].to_pylist(), strict=True))


def _v3_episodes(
    root: Path, info: dict, camera: str | None
) -> tuple[dict[int, str], list[EpisodeRef]]:
    tasks = _v3_tasks(root / "meta/tasks.parquet")
    files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise LeRobotFormatError(f"{root / 'meta/episodes'}: no episode metadata files")
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    if camera:
        columns += [f"videos/{camera}/{k}" for k in ("chunk_index", "file_index", "from_timestamp")]
    episodes = []
    for path in files:
        for row in _read_parquet(path, columns, optional=SVAM_COLUMNS).to_pylist():
            data = root / info["data_path"].format(
                chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
            )
            video, start = None, 0.0
            if camera:
                video = root / info["video_path"].format(
                    video_key=camera,
                    chunk_index=row[f"videos/{camera}/chunk_index"],
                    file_index=row[f"videos/{camera}/file_index"],
                )
                start = float(row[f"videos/{camera}/from_timestamp"])
            svam = {c.removeprefix("svam/"): row[c] for c in SVAM_COLUMNS if row.get(c) is not None}
            episodes.append(
                EpisodeRef(int(row["episode_index"]), int(row["length"]), data, video, start, svam)
            )
    episodes.sort(key=lambda ref: ref.index)
    return tasks, episodes


# ------------------------------------------------------------------------------- writing v3.0


def numeric_stats(values: np.ndarray) -> dict[str, list]:
    """lerobot's per-feature statistics of (N, D) values: min, max, mean, std, count, quantiles."""
    values = values.astype(np.float64).reshape(len(values), -1)
    stats = {
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "count": [len(values)],
    }
    for q, value in zip(QUANTILES, np.quantile(values, QUANTILES, axis=0), strict=True):
        stats[f"q{round(q * 100):02d}"] = value.tolist()
    return stats


def pixel_stats(histogram: np.ndarray, frames: int) -> dict[str, list]:
    """lerobot's statistics of a camera, per channel, shaped (3, 1, 1) and scaled to [0, 1], from
    a (3, 256) histogram of pixel values (exact quantiles: the values are bytes)."""
    levels = np.arange(256) / 255.0
    total = histogram.sum(1, keepdims=True)
    mean = (histogram * levels).sum(1) / total[:, 0]
    std = np.sqrt(np.maximum((histogram * levels**2).sum(1) / total[:, 0] - mean**2, 0))
    cdf = histogram.cumsum(1) / total

    def shaped(per_channel: np.ndarray) -> list:
        return per_channel.reshape(3, 1, 1).tolist()

    stats = {
        "min": shaped(np.array([levels[np.flatnonzero(h)[0]] for h in histogram])),
        "max": shaped(np.array([levels[np.flatnonzero(h)[-1]] for h in histogram])),
        "mean": shaped(mean),
        "std": shaped(std),
        "count": [frames],
    }
    for q in QUANTILES:
        stats[f"q{round(q * 100):02d}"] = shaped(levels[(cdf < q).sum(1)])
    return stats


def _histogram(frames: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(frames[..., c].ravel(), minlength=256) for c in range(3)])


@dataclass(frozen=True)
class VideoSettings:
    codec: str = "libsvtav1"
    pix_fmt: str = "yuv420p"
    crf: int = 30
    gop: int = 2
    preset: int = 12

    def options(self) -> dict[str, str]:
        options = {"g": str(self.gop), "crf": str(self.crf)}
        if self.codec == "libsvtav1":
            options.update(preset=str(self.preset), **{"svtav1-params": "fast-decode=0"})
        return options


class LeRobotV3Writer:
    """Write episodes as a LeRobot v3.0 dataset under `root`: data parquet files (one row group
    per episode), one continuous mp4 stream per camera file, episode metadata with per-episode
    statistics, tasks, `stats.json` and `info.json`. Files roll over at lerobot's sizes."""

    def __init__(
        self,
        root: Path,
        fps: int,
        camera: str,
        image_shape: tuple[int, int],
        state_dim: int,
        action_dim: int,
        video: VideoSettings,
        robot_type: str | None,
    ):
        self.root, self.fps, self.camera = Path(root), int(fps), camera
        self.image_shape, self.state_dim, self.action_dim = image_shape, state_dim, action_dim
        self.video, self.robot_type = video, robot_type
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self.numeric: dict[str, list[np.ndarray]] = {}
        self.histogram = np.zeros((3, 256), np.int64)
        self.frames = 0
        self._data = None  # (ParquetWriter, chunk, file, path)
        self._video: tuple[VideoWriter, int, int] | None = None
        self._data_file = self._video_file = -1

    @property
    def features(self) -> dict[str, Any]:
        height, width = self.image_shape
        features = {
            self.camera: {
                "dtype": "video",
                "shape": [height, width, 3],
                "names": ["height", "width", "channels"],
                "info": {
                    "video.height": height,
                    "video.width": width,
                    "video.codec": "av1" if self.video.codec == "libsvtav1" else self.video.codec,
                    "video.pix_fmt": self.video.pix_fmt,
                    "video.fps": self.fps,
                    "video.channels": 3,
                    "has_audio": False,
                    "video.g": self.video.gop,
                    "video.crf": self.video.crf,
                    "video.preset": self.video.preset,
                    "video.fast_decode": 0,
                    "video.video_backend": "pyav",
                    "video.extra_options": {},
                    "is_depth_map": False,
                },
            },
        }
        if self.state_dim:
            features["observation.state"] = {
                "dtype": "float32",
                "shape": [self.state_dim],
                "names": None,
            }
        features["action"] = {"dtype": "float32", "shape": [self.action_dim], "names": None}
        for name, dtype in DEFAULT_FEATURES.items():
            features[name] = {"dtype": dtype, "shape": [1], "names": None}
        return features

    def _schema(self):
        import pyarrow as pa

        fields = []
        if self.state_dim:
            fields.append(("observation.state", pa.list_(pa.float32(), self.state_dim)))
        fields.append(("action", pa.list_(pa.float32(), self.action_dim)))
        fields += [(name, getattr(pa, dtype)()) for name, dtype in DEFAULT_FEATURES.items()]
        return pa.schema(fields)

    @staticmethod
    def _position(file: int) -> tuple[int, int]:
        return divmod(file, CHUNKS_SIZE)

    def _data_writer(self):
        import pyarrow.parquet as pq

        if self._data is not None and self._data[3].stat().st_size < DATA_FILE_MB * 2**20:
            return self._data
        if self._data is not None:
            self._data[0].close()
        self._data_file += 1
        chunk, file = self._position(self._data_file)
        path = self.root / V3_DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = pq.ParquetWriter(path, self._schema(), compression="snappy")
        self._data = (writer, chunk, file, path)
        return self._data

    def _video_writer(self) -> tuple[VideoWriter, int, int]:
        if self._video is not None and self._video[0].path.stat().st_size < VIDEO_FILE_MB * 2**20:
            return self._video
        if self._video is not None:
            self._video[0].close()
        self._video_file += 1
        chunk, file = self._position(self._video_file)
        path = self.root / V3_VIDEO_PATH.format(
            video_key=self.camera, chunk_index=chunk, file_index=file
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = VideoWriter(
            path,
            self.fps,
            self.image_shape,
            self.video.codec,
            self.video.pix_fmt,
            self.video.options(),
        )
        self._video = (writer, chunk, file)
        return self._video

    def add_episode(
        self,
        frames: np.ndarray,
        state: np.ndarray,
        actions: np.ndarray,
        instruction: str,
        svam: dict[str, Any],
    ) -> None:
        import pyarrow as pa

        length = len(frames)
        index = len(self.episodes)
        task_index = self.tasks.setdefault(instruction, len(self.tasks))
        columns = {
            "action": actions.astype(np.float32),
            "timestamp": (np.arange(length) / self.fps).astype(np.float32),
            "frame_index": np.arange(length, dtype=np.int64),
            "episode_index": np.full(length, index, np.int64),
            "index": np.arange(self.frames, self.frames + length, dtype=np.int64),
            "task_index": np.full(length, task_index, np.int64),
        }
        if self.state_dim:
            columns["observation.state"] = state.astype(np.float32)
        schema = self._schema()
        arrays = []
        for name in schema.names:
            values = columns[name]
            if values.ndim == 2:
                arrays.append(pa.FixedSizeListArray.from_arrays(values.ravel(), values.shape[1]))
            else:
                arrays.append(pa.array(values))
        writer, data_chunk, data_file, _ = self._data_writer()
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        video, video_chunk, video_file = self._video_writer()
        start = video.time
        video.write(frames)
        histogram = _histogram(frames)
        self.histogram += histogram
        record = {
            "episode_index": index,
            "tasks": [instruction],
            "length": length,
            "data/chunk_index": data_chunk,
            "data/file_index": data_file,
            "dataset_from_index": self.frames,
            "dataset_to_index": self.frames + length,
            f"videos/{self.camera}/chunk_index": video_chunk,
            f"videos/{self.camera}/file_index": video_file,
            f"videos/{self.camera}/from_timestamp": start,
            f"videos/{self.camera}/to_timestamp": video.time,
            "meta/episodes/chunk_index": 0,
            "meta/episodes/file_index": 0,
        }
        episode_stats = {self.camera: pixel_stats(histogram, length)}
        for name, values in columns.items():
            episode_stats[name] = numeric_stats(values)
            self.numeric.setdefault(name, []).append(values.reshape(length, -1))
        for name, stats in episode_stats.items():
            record.update({f"stats/{name}/{stat}": value for stat, value in stats.items()})
        record.update(
            {f"svam/{k}": svam.get(k) for k in ("task", "seed", "success", "first_success_step")}
        )
        self.episodes.append(record)
        self.frames += length

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._data is not None:
            self._data[0].close()
        if self._video is not None:
            self._video[0].close()
        meta = self.root / "meta"
        (meta / "episodes/chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episodes), self.root / V3_EPISODES_PATH)
        tasks = sorted(self.tasks.items(), key=lambda item: item[1])
        table = pa.table(
            {
                "task_index": pa.array([i for _, i in tasks], pa.int64()),
                "task": [t for t, _ in tasks],
            }
        )
        # pandas metadata marking `task` as the index, as lerobot's `pd.DataFrame.to_parquet` writes
        # it: lerobot looks a task up as `tasks.iloc[task_index].name`.
        pandas = {
            "index_columns": ["task"],
            "column_indexes": [],
            "columns": [
                {
                    "name": "task_index",
                    "field_name": "task_index",
                    "pandas_type": "int64",
                    "numpy_type": "int64",
                    "metadata": None,
                },
                {
                    "name": "task",
                    "field_name": "task",
                    "pandas_type": "unicode",
                    "numpy_type": "object",
                    "metadata": None,
                },
            ],
            "creator": {"library": "pyarrow", "version": pa.__version__},
            "pandas_version": "2.2.3",
        }
        table = table.replace_schema_metadata({"pandas": json.dumps(pandas)})
        pq.write_table(table, meta / "tasks.parquet")
        stats = {self.camera: pixel_stats(self.histogram, self.frames)}
        stats.update({name: numeric_stats(np.concatenate(v)) for name, v in self.numeric.items()})
        (meta / "stats.json").write_text(json.dumps(stats, indent=2))
        info = {
            "codebase_version": V3_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self.frames,
            "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": DATA_FILE_MB,
            "video_files_size_in_mb": VIDEO_FILE_MB,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": V3_DATA_PATH,
            "video_path": V3_VIDEO_PATH,
            "features": self.features,
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))
