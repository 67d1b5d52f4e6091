"""Memory of a run's processes: each role's peak resident memory, and the machine's."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory(actors: dict) -> dict[str, float]:
    """Peak resident memory (MiB) of each named actor's process, asked of the actor itself;
    an actor that is gone is left out."""
    import ray

    refs = {name: a.__ray_call__.remote(lambda self: peak_rss_mb()) for name, a in actors.items()
            if a is not None}
    out = {}
    for name, ref in refs.items():
        try:
            out[name] = round(float(ray.get(ref, timeout=30)), 1)
        except Exception:  # noqa: BLE001 - a dead or busy role: nothing to report
            continue
    return out


class MemorySampler:
    """The driver machine's used memory (total - available, MiB), sampled every second in a
    daemon thread from `start()`: its peak covers every process of a one-machine run."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.peak, self._thread = every_s, 0.0, None

    def _sample(self) -> float:
        import psutil

        vm = psutil.virtual_memory()
        return (vm.total - vm.available) / 2 ** 20

    def start(self) -> None:
        import threading

        if self._thread is not None:
            return
        self.peak = self._sample()

        def loop():
            import time

            while True:
                self.peak = max(self.peak, self._sample())
                time.sleep(self.every_s)

        self._thread = threading.Thread(target=loop, daemon=True, name="memory-sampler")
        self._thread.start()

    def peak_mb(self) -> float | None:
        return round(self.peak, 1) if self._thread is not None else None
