"""The engine's KV cache layer: keys and values in buffers with room to grow (see engine.py, 5)."""

from __future__ import annotations

from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys/values (R, H, T, D) are views of buffers with spare rows and
    positions: `update` writes the new tokens in place (growing the buffer by doubling when
    full) instead of `torch.cat`, which copies the whole cache for every token; rows join
    (`append_rows`) and leave (`move_rows`) by copying only the rows concerned, not the whole
    batch's cache. Same values as DynamicLayer for what DecodeBatch and the model call
    (update, crop, row selection); a view returned before a `crop` is overwritten by the next
    `update` (the engine never keeps one). No offloading."""

    @classmethod
    def of(cls, keys, values, room: int, rows: int | None = None) -> RoomyLayer:
        layer = cls()
        layer.device, layer.is_initialized = keys.device, True
        layer._set(keys, values, room, rows)
        return layer

    def _set(self, keys, values, room: int, rows: int | None = None) -> None:
        """Fresh buffers holding `keys`/`values`, with `room` positions and `rows` rows in all."""
        R, H, T, D = keys.shape
        self._kb = keys.new_empty(max(R, rows or 0), H, T + room, D)
        self._vb = values.new_empty(max(R, rows or 0), H, T + room, D)
        self._kb[:R, :, :T] = keys
        self._vb[:R, :, :T] = values
        self._r = R
        self._view(T)

    def _view(self, n: int) -> None:
        self._n = n
        self.keys, self.values = self._kb[: self._r, :, :n], self._vb[: self._r, :, :n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self._n, key_states.shape[-2]
        if n + m > self._kb.shape[-2]:
            self._set(self.keys, self.values, max(n, m, 64), self._kb.shape[0])
        self._kb[: self._r, :, n : n + m] = key_states
        self._vb[: self._r, :, n : n + m] = value_states
        self._view(n + m)
        return self.keys, self.values

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.is_initialized = key_states.device, True
        self._set(key_states[..., :0, :], value_states[..., :0, :], 64)

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx.to(self._kb.device))

    def offload(self) -> None:
        raise NotImplementedError("the engine's batch cache stays on its device")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._view(max(0, self._n + tokens_to_remove))

    def trim_front(self, lead: int) -> None:
        """Drop the first `lead` positions of every row (columns that hold only padding)."""
        self._kb, self._vb = self._kb[:, :, lead:], self._vb[:, :, lead:]
        self._view(self._n - lead)

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized:
            self._set(self.keys[indices], self.values[indices], self._kb.shape[-2] - self._n)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._set(
                self.keys.repeat_interleave(repeats, dim=0),
                self.values.repeat_interleave(repeats, dim=0),
                self._kb.shape[-2] - self._n,
            )

    def move_rows(self, dst, src, rows: int) -> None:
        """Copy rows `src` into rows `dst` (index tensors), then keep the first `rows` rows:
        rows leave by moving the last live rows into their places, a copy of the moved rows
        only (`batch_select_indices` would copy every row)."""
        if len(dst):  # the used positions only; the right side is gathered first: no overlap issue
            self._kb[dst, :, : self._n] = self._kb[src, :, : self._n]
            self._vb[dst, :, : self._n] = self._vb[src, :, : self._n]
        self._r = rows
        self._view(self._n)

    def append_rows(self, parts) -> None:
        """Add rows after the live ones: `parts` holds (keys, values, n) per job, keys/values
        (1, H, P, D) with P <= the current length, each written right-aligned (its padding
        zeroed, as F.pad would) into `n` rows. The buffer grows by half when out of rows."""
        need = self._r + sum(n for _, _, n in parts)
        if need > self._kb.shape[0]:
            k, v = self.keys, self.values
            self._set(k, v, self._kb.shape[-2] - self._n, max(need, self._r + self._r // 2))
        r, n = self._r, self._n
        for k, v, m in parts:
            P = k.shape[-2]
            for buf, x in ((self._kb, k), (self._vb, v)):
                buf[r : r + m, :, : n - P] = 0
                buf[r : r + m, :, n - P : n] = x
            r += m
        self._r = r
        self._view(n)
