import numpy as np

from rlhf_ray.feedback.clips import ClipRenderer, render_segments
from rlhf_ray.storage.store import PreferenceStore

WEBM = b"\x1a\x45\xdf\xa3"


def test_atari_frames_become_a_webm_clip():
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 255, size=(10, 84, 84, 4), dtype=np.uint8)
    r = ClipRenderer({"id": "ALE/Pong-v5", "preprocessing": "atari"}, height=168, frame_skip=1)
    frames = r.frames({"obs": obs, "actions": np.zeros(10), "true_rewards": np.zeros(10)})
    assert frames.shape == (10, 168, 168, 3)
    assert np.array_equal(frames[3, ::2, ::2, 0], obs[3, :, :, -1])  # newest frame, upscaled
    clip = r.encode(frames)
    assert clip[:4] == WEBM and len(clip) > 500


def test_mujoco_segments_render_from_saved_state(tmp_path):
    import gymnasium as gym

    env = gym.make("Hopper-v5")
    env.reset(seed=0)
    u = env.unwrapped
    qpos = np.stack([u.init_qpos + [0, 0.1 * t, 0, 0, 0, 0] for t in range(6)])
    qvel = np.zeros((6, u.model.nv))
    arrays = {"obs": np.zeros((6, 11)), "actions": np.zeros((6, 3)), "true_rewards": np.zeros(6),
              "state_qpos": qpos, "state_qvel": qvel}
    r = ClipRenderer({"id": "Hopper-v5"}, width=64, height=48, frame_skip=2)
    frames = r.frames(arrays)
    assert frames.shape == (3, 48, 64, 3)
    assert not np.array_equal(frames[0], frames[2])  # the body moved: the state was applied
    # rendered once, then cached beside the store
    from rlhf_ray.core.segments import SegmentBatch

    batch = SegmentBatch(ids=["seg-a"], arrays={k: v[None] for k, v in arrays.items()})
    store = PreferenceStore(str(tmp_path))
    assert render_segments(r, store, batch) == 1 and render_segments(r, store, batch) == 0
    assert store.read_clip("seg-a")[:4] == WEBM
    r.close()
