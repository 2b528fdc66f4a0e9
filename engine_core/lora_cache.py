"""The LoRA adapters the workers hold, decided here: at most `max_cpu_loras`, least recently used
evicted. Each step tells the workers what to drop and what to load before its forward, so every
rank holds the same adapters and the core knows which ones an id-only request may name."""

from collections import OrderedDict


class LoRACache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.loaded: OrderedDict[int, str] = OrderedDict()  # id -> path, least recently used first
        self.paths: dict[int, str] = {}  # every id ever named with its path: an id names one adapter
        self.num_loads = 0

    def resolve(self, lora_id: int, path: str | None, pending: bool) -> tuple[str | None, str | None]:
        """(path, None) for a request naming `lora_id`, or (None, why it cannot run). Without a path
        the adapter must be held by the workers, or `pending`: named with its path by a request
        still unfinished."""
        if path is not None:
            known = self.paths.setdefault(lora_id, path)
            if known != path:
                return None, (f"lora_id {lora_id} names the adapter at {known}; the adapter at {path} needs "
                              "an id of its own")
            return path, None
        if lora_id in self.loaded or pending:
            return self.paths[lora_id], None
        return None, (f"LoRA adapter {lora_id} is not loaded (evicted, or never sent; the engine keeps "
                      f"{self.capacity}): send it again with its path or weights")

    def prepare(self, step_loras: dict[int, str]) -> tuple[list[int], dict[int, str]]:
        """(evictions, loads) that leave the workers holding every adapter of a step (id -> path)."""
        for lora_id in step_loras:
            if lora_id in self.loaded:
                self.loaded.move_to_end(lora_id)
        evictions, loads = [], {}
        for lora_id, path in step_loras.items():
            if lora_id in self.loaded:
                continue
            if len(self.loaded) >= self.capacity:  # the least recent is not in this step: it has <= capacity
                evictions.append(self.loaded.popitem(last=False)[0])
            self.loaded[lora_id] = loads[lora_id] = path
            self.num_loads += 1
        return evictions, loads
