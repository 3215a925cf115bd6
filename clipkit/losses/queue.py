"""A FIFO queue of image and text features of earlier batches: negatives beyond the batch (MoCo, ALBEF).

MoCo (He et al. 2020, https://arxiv.org/abs/1911.05722) decouples the number of negatives from the batch size by
keeping the keys of the last K samples; ALBEF (Li et al. 2021, https://arxiv.org/abs/2107.07651) keeps an image queue
and a text queue of K = 65,536 each. Here every rank enqueues the gathered global batch (all ranks hold the same
queue, so `ContrastiveLoss` sees identical columns everywhere), the write pointer wraps around (K need not be a
multiple of the global batch), and `state_dict()` holds everything an exact resume needs.

Use per optimizer step, in this order: `image_q, text_q, ids_q = queue.columns()` -> loss with those columns ->
backward / step -> `queue.enqueue(image_keys, text_keys, caption_ids)` with this step's keys (momentum-model
features, or the online model's detached features for cross-batch memory).
"""

from __future__ import annotations

import torch

from clipkit.distributed import gather_detached


class FeatureQueue:
    """Image and text features of the last `size` samples, in FIFO order, the same on every rank.

    image, text: [size, dim] buffers of `dtype`; caption_ids: [size] int64 (only with track_caption_ids), the ids
    `ContrastiveLoss(..., caption_ids=...)` compares for duplicate masking. `ptr` is the slot the next entry goes
    to; `filled` counts the valid entries (min(samples enqueued, size)).
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        track_caption_ids: bool = False,
    ):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"queue size must be a positive int (the number of queued samples), got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"queue feature dim must be a positive int, got {dim!r}")
        self.size, self.dim = size, dim
        self.image = torch.zeros(size, dim, dtype=dtype, device=device)
        self.text = torch.zeros(size, dim, dtype=dtype, device=device)
        self.caption_ids = torch.zeros(size, dtype=torch.int64, device=device) if track_caption_ids else None
        self.ptr = 0
        self.filled = 0

    @property
    def fill_fraction(self) -> float:
        """filled / size, in [0, 1]: for logging (the queue only holds K negatives once it reads 1.0)."""
        return self.filled / self.size

    def columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(image [n, dim], text [n, dim], caption_ids [n] int64 or None) of the n = filled valid entries.

        Views of the buffers (no copy), in slot order; before the first wrap-around the valid entries are slots
        0 .. n-1. Pass them to ContrastiveLoss as image_queue, text_queue, queue_caption_ids; they change at the
        next enqueue.
        """
        n = self.filled
        ids = None if self.caption_ids is None else self.caption_ids[:n]
        return self.image[:n], self.text[:n], ids

    @torch.no_grad()
    def enqueue(
        self, image_keys: torch.Tensor, text_keys: torch.Tensor, caption_ids: torch.Tensor | None = None
    ) -> None:
        """Append this rank's [B, dim] image and text keys (and [B] int64 caption ids) of every rank, oldest out.

        Collective under torch.distributed: every rank must call it with the same B; the global batch [W*B, dim] is
        gathered (rank order) and written at ptr, wrapping around. A global batch larger than the queue keeps its
        last `size` entries. Keys are stored detached, cast to the queue's dtype and device.
        """
        if image_keys.ndim != 2 or image_keys.shape != text_keys.shape or image_keys.shape[1] != self.dim:
            raise ValueError(
                f"enqueue needs image and text keys of the same [B, {self.dim}] shape, got "
                f"{tuple(image_keys.shape)} and {tuple(text_keys.shape)}"
            )
        if (caption_ids is None) != (self.caption_ids is None):
            raise ValueError(
                "this queue tracks caption ids, enqueue needs caption_ids"
                if caption_ids is None
                else "caption_ids given but the queue was built without track_caption_ids=True"
            )
        if caption_ids is not None and caption_ids.shape != (image_keys.shape[0],):
            raise ValueError(f"caption_ids must have shape [{image_keys.shape[0]}], got {tuple(caption_ids.shape)}")
        new = [gather_detached(image_keys), gather_detached(text_keys)]
        buffers = [self.image, self.text]
        if caption_ids is not None:
            new.append(gather_detached(caption_ids.to(torch.int64)))
            buffers.append(self.caption_ids)
        count = new[0].shape[0]
        first = max(0, count - self.size)  # entries that would be overwritten within this same batch are skipped
        slots = (self.ptr + torch.arange(first, count, device=self.image.device)) % self.size
        for buffer, values in zip(buffers, new):
            buffer[slots] = values[first:].to(buffer.device, buffer.dtype)
        self.ptr = (self.ptr + count) % self.size
        self.filled = min(self.size, self.filled + count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-compatible): image, text, [caption_ids,] ptr and filled (0-dim int64)."""
        state = {"image": self.image, "text": self.text}
        state |= {"ptr": torch.tensor(self.ptr), "filled": torch.tensor(self.filled)}
        if self.caption_ids is not None:
            state["caption_ids"] = self.caption_ids
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores a state_dict() of a queue built with the same size, dim and track_caption_ids (else ValueError)."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"queue state has keys {sorted(state)}, expected {sorted(expected)}")
        for name in ("image", "text", "caption_ids"):
            if name in state and state[name].shape != getattr(self, name).shape:
                raise ValueError(
                    f"queue state {name!r} has shape {tuple(state[name].shape)}, this queue "
                    f"{tuple(getattr(self, name).shape)} (--queue-size or the model's embed dim changed?)"
                )
        ptr, filled = int(state["ptr"]), int(state["filled"])
        if not (0 <= ptr < self.size and 0 <= filled <= self.size):
            raise ValueError(f"queue state has ptr {ptr} and filled {filled}, outside a queue of size {self.size}")
        for name in ("image", "text", "caption_ids"):
            if name in state:
                getattr(self, name).copy_(state[name])
        self.ptr, self.filled = ptr, filled
