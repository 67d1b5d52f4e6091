"""`rlhf-ray sweep`: Ray Tune over the whole RLHF loop of either workload."""
