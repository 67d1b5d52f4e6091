"""Clips of queried segments, rendered only when a human will look at them.

MuJoCo segments are re-rendered from the saved simulator state (qpos/qvel per step: set the
state, render), Atari segments from their stored frames (the newest frame of each stacked
observation). Clips are VP8 WebM (Chromium plays it; the encoder is the ffmpeg inside the
`imageio-ffmpeg` wheel) and are cached beside the store (`preferences/clips/<segment>.webm`),
so a clip is rendered once however often it is shown.

`ClipRenderWorker` is the Ray actor that keeps clips ahead of the labelers: it pulls clip
queries that are not rendered yet from the labeler, renders both segments and marks the query
ready; the labeler only offers ready queries, so the page never waits on a render.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np

from rlhf_ray.core.segments import SegmentBatch
from rlhf_ray.storage.store import PreferenceStore


class ClipRenderer:
    """Segments -> frames -> WebM bytes. One per process; not thread-safe (one GL context)."""

    def __init__(self, env_config: dict, width: int = 160, height: int = 120, fps: int = 25,
                 frame_skip: int = 2, shadows: bool = False):
        self.env_config = dict(env_config)
        self.shadows = shadows
        self.atari = env_config.get("preprocessing") == "atari"
        self.width, self.height, self.fps = width, height, fps
        self.frame_skip = max(1, frame_skip)
        self._env = None

    def _mujoco_env(self):
        if self._env is None:
            import gymnasium as gym

            os.environ.setdefault("MUJOCO_GL", "egl")
            kwargs = dict(self.env_config.get("kwargs") or {})
            self._env = gym.make(self.env_config["id"], render_mode="rgb_array",
                                 width=self.width, height=self.height, **kwargs)
            self._env.reset(seed=0)
            self._env.render()
            if not self.shadows:  # on a CPU (EGL, llvmpipe) these cost 5x: 0.05 vs 0.01 s/frame
                import mujoco

                viewer = self._env.unwrapped.mujoco_renderer._get_viewer("rgb_array")
                viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return self._env

    def frames(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """One segment's frames [T, H, W, 3] uint8 (every `frame_skip`-th step)."""
        steps = range(0, arrays["obs"].shape[0], self.frame_skip)
        if "state_qpos" in arrays and "state_qvel" in arrays:
            env = self._mujoco_env()
            u = env.unwrapped
            out = []
            for t in steps:
                u.set_state(arrays["state_qpos"][t], arrays["state_qvel"][t])
                out.append(env.render())
            return np.stack(out).astype(np.uint8)
        obs = arrays["obs"]
        if obs.ndim == 4:  # stacked frames: [T, H, W, C] or [T, C, H, W]
            last = obs[..., -1] if obs.shape[-1] <= 4 else obs[:, -1]
            frames = np.asarray(last)[list(steps)]
            if frames.dtype != np.uint8:
                frames = np.clip(frames * (255.0 if frames.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            scale = max(1, self.height // frames.shape[1])
            frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
            return np.repeat(frames[..., None], 3, axis=-1)
        raise ValueError("segment has neither MuJoCo state (state_qpos/state_qvel) nor image "
                         f"observations (obs shape {obs.shape}): nothing to render")

    def encode(self, frames: np.ndarray) -> bytes:
        """Frames -> VP8 WebM bytes."""
        import imageio_ffmpeg

        t, h, w = frames.shape[:3]
        if h % 2 or w % 2:  # yuv420p wants even sizes
            frames = frames[:, : h - h % 2, : w - w % 2]
            h, w = h - h % 2, w - w % 2
        fd, path = tempfile.mkstemp(suffix=".webm")
        os.close(fd)
        try:
            gen = imageio_ffmpeg.write_frames(
                path, (w, h), fps=self.fps, codec="libvpx", pix_fmt_out="yuv420p",
                bitrate="600k", macro_block_size=1, ffmpeg_log_level="error",
                output_params=["-deadline", "realtime", "-cpu-used", "8", "-auto-alt-ref", "0"])
            gen.send(None)
            for f in frames:
                gen.send(np.ascontiguousarray(f))
            gen.close()
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    def render(self, arrays: dict[str, np.ndarray]) -> bytes:
        return self.encode(self.frames(arrays))

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def render_segments(renderer: ClipRenderer, store, batch: SegmentBatch) -> int:
    """Render every segment of `batch` that has no cached clip yet; returns how many."""
    n = 0
    for i, sid in enumerate(batch.ids):
        if store.has_clip(sid):
            continue
        store.write_clip(sid, renderer.render({k: v[i] for k, v in batch.arrays.items()}))
        n += 1
    return n


class ClipRenderWorker:
    """Ray actor: renders the clips of pending queries ahead of the labelers."""

    def __init__(self, labeler_name: str, namespace: str, store_root: str, env_config: dict,
                 width: int = 160, height: int = 120, fps: int = 25, frame_skip: int = 2,
                 shadows: bool = False, poll_s: float = 0.25):
        self.labeler_name, self.namespace = labeler_name, namespace
        self.store = PreferenceStore(store_root)
        self.args = (env_config, width, height, fps, frame_skip, shadows)
        self.poll_s = poll_s
        self.rendered = 0
        self.render_s = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clip-render", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import ray

        renderer = ClipRenderer(*self.args)  # GL context lives in this thread
        labeler = ray.get_actor(self.labeler_name, namespace=self.namespace)
        while not self._stop.is_set():
            try:
                todo = ray.get(labeler.to_render.remote(2))
                if not todo:
                    self._stop.wait(self.poll_s)
                    continue
                for qid, pair in todo:
                    t0 = time.perf_counter()
                    self.rendered += render_segments(renderer, self.store, pair)
                    self.render_s += time.perf_counter() - t0
                    labeler.mark_ready.remote([qid])
            except Exception as exc:  # noqa: BLE001 - keep serving; report through stats()
                self.error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(1.0)
        renderer.close()

    def stats(self) -> dict:
        return {"clips_rendered": self.rendered, "render_s": round(self.render_s, 3),
                "error": self.error}

    def stop(self) -> None:
        self._stop.set()
