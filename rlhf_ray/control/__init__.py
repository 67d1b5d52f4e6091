"""The control workload: deep RL from human preferences (Christiano et al. 2017) on
gymnasium envs with RLlib PPO."""
