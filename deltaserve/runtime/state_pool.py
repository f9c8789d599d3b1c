"""GDN state slots: one per running request (its conv + recurrent state in every GDN layer).

Bookkeeping only: the tensors live in the model runner. A slot handed out here must be zeroed before its first
forward (the scheduler reports it in SchedulerOutput.slots_to_zero), so no state leaks between requests.
"""


class StatePool:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"need at least one state slot, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if slot < 0 or slot >= self.num_slots or slot in self._free:
            raise RuntimeError(f"state slot {slot} freed twice or out of range")
        self._free.append(slot)
