"""The PPO policy: RLlib's default actor-critic module, with the Gaussian's initial action
noise set by `ppo.log_std_init` (a diagonal Gaussian over continuous actions; discrete
actions are left alone).

Why the start matters: PPO without an entropy bonus shrinks the noise only as fast as the
returns pull it. From RLlib's start (log std about 0, std 1 on a [-1, 1] action) the noise
was still 0.70-0.97 after 300k Walker2d steps, with true and learned rewards alike, and the
policy's mean actions, the final evaluation's yardstick, were a controller that training
never ran: in 3 of 12 RLHF runs they fell at once and lay still in 1 to 3 of 10 episodes,
where the same policy's samples walked (docs/results). rl-baselines3-zoo's tuned PPO for
Hopper, HalfCheetah and Humanoid starts the noise low too (log std -2). The state-dependent
log std (RLlib's default) starts at the output layer's bias, its weights at 0 (the same
noise in every state); a free one (`free_log_std`) at its parameter.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import (
    DefaultPPOTorchRLModule,
)


class PPOPolicyModule(DefaultPPOTorchRLModule):
    """`DefaultPPOTorchRLModule` whose log std starts at `model_config["log_std_init"]`."""

    def setup(self):
        super().setup()
        init = (self.model_config or {}).get("log_std_init")
        if init is None or not isinstance(self.action_space, gym.spaces.Box):
            return
        with torch.no_grad():
            if isinstance(getattr(self.pi, "log_std", None), torch.nn.Parameter):
                self.pi.log_std.fill_(init)
            else:  # means, then log stds: the last layer's second half, the same in every
                # state at the start (gradients still reach its weights through the features)
                last = [m for m in self.pi.net.modules() if isinstance(m, torch.nn.Linear)][-1]
                half = last.out_features // 2
                last.weight[half:] = 0.0
                last.bias[half:] = init
