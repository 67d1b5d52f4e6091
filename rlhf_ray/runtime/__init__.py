"""The run's life both workloads share: the controller base, the run folder, metrics,
placement, actor options, Serve helpers, cluster start-up, the console, and the seam
(`workload.py`) through which the shared layer reaches a workload."""
