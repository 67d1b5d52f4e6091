"""The reward-predictor ensemble (Christiano et al. 2017, section 2.2.3 and appendix A).

Two nets, one interface: an MLP on (observation, action) for state-based envs and a CNN on
stacked frames for Atari. K members; each member's output is normalized to zero mean and a
configured std (`output_std`) before the members are averaged, so the policy sees a reward of
a fixed scale whatever the members learned. Weights travel as flat name->tensor dicts
(safetensors-compatible), never pickles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from rlhf_ray.storage import locations


@dataclass(frozen=True)
class RewardNetSpec:
    """Everything needed to rebuild an ensemble on another process (JSON-able)."""

    net: str  # "mlp" | "cnn"
    obs_shape: tuple[int, ...]
    act_dim: int  # flat action size; for discrete actions the number of actions
    discrete: bool = False
    hidden: tuple[int, ...] = (64, 64)
    ensemble_size: int = 3
    output_std: float = 1.0
    dropout: float = 0.0
    batch_norm: bool = False
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def for_env(net: str, observation_space, action_space, cfg,
                score_area: list | None = None) -> "RewardNetSpec":
        """The spec for an env's spaces and a `RewardModelConfig` (discrete actions are
        one-hot: their number is the action size); `score_area`: boxes the CNN sees blank."""
        discrete = hasattr(action_space, "n")
        act_dim = int(action_space.n) if discrete else int(np.prod(action_space.shape))
        return RewardNetSpec(net=net, obs_shape=tuple(observation_space.shape), act_dim=act_dim,
                             discrete=discrete, hidden=tuple(cfg.hidden),
                             ensemble_size=cfg.ensemble_size, output_std=cfg.output_std,
                             dropout=cfg.dropout, batch_norm=cfg.batch_norm,
                             extra={"score_area": [list(b) for b in score_area]}
                             if score_area else {})

    @staticmethod
    def from_json(text: str) -> "RewardNetSpec":
        data = json.loads(text)
        data["obs_shape"] = tuple(data["obs_shape"])
        data["hidden"] = tuple(data["hidden"])
        return RewardNetSpec(**data)


class MLPReward(nn.Module):
    """r(o, a) for state-based envs: the paper's 2x64 leaky-ReLU MLP by default.

    The input (observation, action) is standardized by `in_mean` / `in_std`, buffers that
    travel with the weights (identity until the trainer fits them: `RewardEnsemble.
    fit_input_normalizer`). MuJoCo observations mix angles (~0.1) with joint velocities
    (~10): unstandardized, the large features dominate the first layer's gradients and its
    L2 penalty, and the reward model learns the task's real signal (e.g. forward velocity)
    last."""

    def __init__(self, spec: RewardNetSpec):
        super().__init__()
        in_dim = int(np.prod(spec.obs_shape)) + spec.act_dim
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        layers: list[nn.Module] = []
        for width in spec.hidden:
            layers += [nn.Linear(in_dim, width), nn.LeakyReLU(0.01)]
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        self.body = nn.Sequential(*layers)
        self.spec = spec

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """obs: [N, *obs_shape], act: [N, act_dim] or [N] (discrete) -> [N]."""
        x = (self.raw_inputs(obs, act) - self.in_mean) / self.in_std
        return self.body(x).squeeze(-1)

    def raw_inputs(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """The unstandardized input rows [N, in_dim] (one-hot actions for discrete envs)."""
        x = obs.reshape(obs.shape[0], -1).float()
        if self.spec.discrete:
            a = nn.functional.one_hot(act.long().reshape(-1), self.spec.act_dim).float()
        else:
            a = act.reshape(act.shape[0], -1).float()
        return torch.cat([x, a], dim=-1)

    @torch.no_grad()
    def set_input_normalizer(self, mean: torch.Tensor, std: torch.Tensor,
                             preserve: bool) -> None:
        """Standardize inputs with (mean, std) from now on. `preserve`: rescale the first
        layer so the member computes exactly the same function as before (a trained
        member keeps its predictions; only the conditioning of later training changes)."""
        if preserve:
            first = self.body[0]
            delta = (mean - self.in_mean) / self.in_std  # [in_dim]
            first.bias.add_(first.weight @ delta)
            first.weight.mul_((std / self.in_std)[None, :])
        self.in_mean.copy_(mean)
        self.in_std.copy_(std)


class CNNReward(nn.Module):
    """r(o) on stacked 84x84 frames: the paper's Atari predictor (4 conv layers of 16 filters,
    7x7/5x5/3x3/3x3, strides 3/2/1/1, leaky ReLU, then a 64-unit layer). Actions are not used.
    The boxes of `spec.extra["score_area"]` are blanked in every frame it sees (training,
    scoring, the Serve deployment alike): it cannot read the reward off the screen."""

    def __init__(self, spec: RewardNetSpec):
        super().__init__()
        self.score_area = [tuple(b) for b in spec.extra.get("score_area", [])]
        h, w, c = spec.obs_shape  # HWC as the Atari wrappers emit
        convs: list[nn.Module] = []
        for k, s in ((7, 3), (5, 2), (3, 1), (3, 1)):
            convs.append(nn.Conv2d(c, 16, k, s))
            if spec.batch_norm:
                convs.append(nn.BatchNorm2d(16))
            convs.append(nn.LeakyReLU(0.01))
            if spec.dropout:
                convs.append(nn.Dropout2d(spec.dropout))
            c = 16
        self.convs = nn.Sequential(*convs).eval()  # sizing pass: batch norm's stats untouched
        with torch.no_grad():
            n = self.convs(torch.zeros(1, spec.obs_shape[2], h, w)).numel()
        self.convs.train()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(n, 64), nn.LeakyReLU(0.01),
                                  nn.Linear(64, 1))

    def forward(self, obs: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
        x = obs.float()
        if obs.dtype == torch.uint8:
            x = x / 255.0
        if self.score_area:
            x = x.clone() if x is obs else x
            for r0, r1, c0, c1 in self.score_area:
                x[:, r0:r1, c0:c1] = 0.0
        x = x.permute(0, 3, 1, 2)
        return self.head(self.convs(x)).squeeze(-1)


def build_member(spec: RewardNetSpec) -> nn.Module:
    if spec.net == "mlp":
        return MLPReward(spec)
    if spec.net == "cnn":
        return CNNReward(spec)
    raise ValueError(f"unknown reward net {spec.net!r}: use 'mlp' or 'cnn'")


class RewardEnsemble(nn.Module):
    """K members plus per-member output normalizers (mean, std of raw outputs)."""

    def __init__(self, spec: RewardNetSpec, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.spec = spec
        self.members = nn.ModuleList(build_member(spec) for _ in range(spec.ensemble_size))
        self.register_buffer("norm_mean", torch.zeros(spec.ensemble_size))
        self.register_buffer("norm_std", torch.ones(spec.ensemble_size))

    def raw_member(self, k: int, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.members[k](obs, act)

    @torch.no_grad()
    def member_rewards(self, obs: torch.Tensor, act: torch.Tensor,
                       chunk: int = 4096) -> torch.Tensor:
        """Normalized per-member rewards: [K, N]."""
        outs = []
        for start in range(0, max(1, obs.shape[0]), chunk):
            o, a = obs[start:start + chunk], act[start:start + chunk]
            raw = torch.stack([m(o, a) for m in self.members])  # [K, n]
            outs.append((raw - self.norm_mean[:, None]) / self.norm_std[:, None]
                        * self.spec.output_std)
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def fit_input_normalizer(self, obs: torch.Tensor, act: torch.Tensor, preserve: bool,
                             min_std: float = 1e-2) -> bool:
        """Standardize every member's inputs by the mean and std of these transitions (MLP
        members; frames are already scaled). A feature whose std is below `min_std` (one
        that has not moved yet: a contact flag, a joint at rest) is only centred, not
        scaled, so it is not blown up once it moves (its first-layer weights got almost no
        gradient); one-hot actions are left as they are. Returns whether anything was
        set."""
        if self.spec.net != "mlp" or obs.shape[0] < 2:
            return False
        rows = self.members[0].raw_inputs(obs, act).double()
        mean = rows.mean(dim=0).float()
        std = rows.std(dim=0).float()
        std = torch.where(std < min_std, torch.ones_like(std), std)
        if self.spec.discrete:
            mean[-self.spec.act_dim:] = 0.0
            std[-self.spec.act_dim:] = 1.0
        for m in self.members:
            m.set_input_normalizer(mean, std, preserve)
        return True

    @torch.no_grad()
    @torch.no_grad()
    def fit_normalizers(self, obs: torch.Tensor, act: torch.Tensor) -> None:
        """Set each member's normalizer from its raw outputs on a sample of transitions (in
        chunks of about 128 MB of float inputs: 20,000 Atari frames are 2.3 GB)."""
        per_row = 4 * int(np.prod(obs.shape[1:]))
        chunk = max(256, 2 ** 27 // max(per_row, 1))
        raw = torch.stack([torch.cat([m(obs[i:i + chunk], act[i:i + chunk])
                                      for i in range(0, len(obs), chunk)])
                           for m in self.members])
        self.norm_mean.copy_(raw.mean(dim=1))
        self.norm_std.copy_(raw.std(dim=1).clamp_min(1e-6))

    def flat_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_flat_state(self, state: dict[str, torch.Tensor | np.ndarray]) -> None:
        state = {k: torch.as_tensor(v) for k, v in state.items()}
        # weights saved before inputs were standardized: identity normalizers, same function
        for k, v in self.state_dict().items():
            if k.endswith((".in_mean", ".in_std")) and k not in state:
                state[k] = torch.zeros_like(v) if k.endswith("in_mean") else torch.ones_like(v)
        self.load_state_dict(state)


def as_tensors(obs: np.ndarray, act: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.from_numpy(np.ascontiguousarray(obs))
    if o.dtype == torch.float64:
        o = o.float()
    a = torch.from_numpy(np.ascontiguousarray(act))
    if a.dtype == torch.float64:
        a = a.float()
    return o, a


def save_weights(path: str, state: dict[str, torch.Tensor], spec: RewardNetSpec,
                 version: int) -> None:
    from safetensors.torch import save_file

    save_file(state, path, metadata={"spec": spec.to_json(), "version": str(version),
                                     "format": "rlhf-ray-reward-v1"})


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], RewardNetSpec, int]:
    """A reward_model.safetensors file, from a path or a URI (s3://, gs://)."""
    from safetensors import safe_open

    with safe_open(locations.local_file(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "rlhf-ray-reward-v1":
        raise ValueError(f"{path}: not an rlhf-ray reward-model file (format {meta.get('format')!r})")
    return state, RewardNetSpec.from_json(meta["spec"]), int(meta["version"])
