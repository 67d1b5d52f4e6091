"""The LLM workload: InstructGPT's SFT -> reward model from rankings -> PPO with a KL penalty."""
