"""The DALI loader's default source: micro-batches handed to DALI as views of the shards' memory maps.

Why: every copy of a 9.4 MB latent costs as much as reading it. Through python workers (`parallel=True`)
a batch is copied three times (into the worker's buffer, into DALI's shared memory, into DALI's output);
here it is copied once, by DALI's own threads, straight out of the page cache into the pipeline's output
(`fn.external_source(no_copy=True)`, which the classic executor copies into its output buffers).

DALI copies one batch *sample* per thread task and needs every output of an iteration to have the same
batch size, so a micro-batch travels as K "lanes" (DALI samples) in two outputs:

- `latents`: each sample's latent split along its first dim into `c` equal, contiguous pieces (views of the
  map), K = n·c pieces, a few per DALI thread (`LANES_PER_THREAD`), so that the threads share the copy;
- `rest`: every other host field (text embeddings, masks, scalars, `sample_valid`) packed by `read_packed`
  (megagen/data/packed_batch.py) into one small buffer of a ring (the buffer's one copy), cut into K equal
  lanes.

The consumer reshapes both outputs back (`unpack`) into the host batch of the torch loader: same keys,
dtypes, values and order. With `on_error="skip"` an unusable sample gets the torch loader's placeholder.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megagen.data.contract import MicroBatchRequest
from megagen.data.format import LATENTS, SampleSkipped
from megagen.data.packed_batch import (
    FieldSpec,
    host_specs,
    pack_layout,
    read_packed,
    unpack_batch,
)
from megagen.data.read_ahead import on_thread

LANE_ALIGN = 64


LANES_PER_THREAD = 4
"""Lanes per DALI thread: a few each, so that a thread slowed by the Python work is not waited for
(measured on 2 cores: 1 lane per thread ≈ 0.85 of the raw read speed, 4 per thread ≈ 0.95)."""


def latent_pieces(first_dim: int, n: int, lanes: int) -> int:
    """Pieces per latent (a divisor of its first dim): the fewest that make at least `lanes` lanes."""
    for c in range(1, first_dim + 1):
        if first_dim % c == 0 and n * c >= lanes:
            return c
    return first_dim


class MapLayout:
    """How the micro-batches of one bucket travel: latent shape, pieces per latent, the rest's fields."""

    def __init__(self, reader, bucket: str, threads: int):
        specs = host_specs(reader, bucket)
        if not specs or specs[0][0] != LATENTS:
            raise ValueError(f"bucket {bucket}: the host batch must start with {LATENTS!r}, got {specs}")
        self.latent_shape = specs[0][2]
        self.latent_zeros = np.zeros(self.latent_shape, np.dtype(reader.manifest.fields[LATENTS].dtype))
        """The placeholder of a skipped sample's latent (`on_error="skip"`), as in the torch loader."""
        self.rest: tuple[FieldSpec, ...] = specs[1:]
        self.threads = threads

    def lanes(self, n: int) -> tuple[int, int]:
        """(pieces per latent, lanes K) of an n-sample micro-batch (one empty lane when n = 0)."""
        lanes = self.threads * LANES_PER_THREAD
        c = latent_pieces(self.latent_shape[0], n, lanes) if self.latent_shape else 1
        return c, max(n * c, 1)

    def rest_lane_bytes(self, n: int) -> int:
        size = pack_layout(self.rest, n)[1]
        k = self.lanes(n)[1]
        return math.ceil(size / k / LANE_ALIGN) * LANE_ALIGN

    def most(self, top: int) -> tuple[int, int]:
        """(lanes, rest bytes) that fit every micro-batch of up to `top` samples — a maximum over all sizes:
        lanes are not monotone in n (4 channels, 8 lanes wanted: 3 samples make 12 lanes, 4 make 8)."""
        sizes = range(top + 1)
        return (
            max(self.lanes(n)[1] for n in sizes),
            max(self.rest_lane_bytes(n) * self.lanes(n)[1] for n in sizes),
        )

    def unpack(self, latents: torch.Tensor, rest: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """The two outputs of one micro-batch (lanes first, any device) → the host batch."""
        batch = {LATENTS: latents.reshape(n, *self.latent_shape)}
        size = pack_layout(self.rest, n)[1]
        batch.update(unpack_batch(rest.reshape(-1)[:size], self.rest, n))
        return batch


class MapSource:
    """DALI's external-source callback (`batch=True, batch_info=True, no_copy=True`, main process):
    iteration i = request i as (latent pieces, rest lanes). Raises StopIteration past the last request.

    DALI calls it from the thread that runs the pipeline — the training loop's, on a GPU — so the Python
    work (locating samples, packing the rest) runs `ahead` requests in advance on a read-ahead thread and
    the call only dequeues; a read error is raised at its own request.

    `no_copy` means DALI reads these arrays after the callback returns: the latent pieces are views of the
    reader's maps (alive while the reader is open), the rest buffers a ring of `ring` buffers, more than the
    requests prepared ahead plus those DALI can hold unconsumed (its prefetch queue + the one being run).
    """

    def __init__(
        self,
        reader,
        requests,
        layouts: dict[str, MapLayout],
        micro: dict[str, int],
        ring: int,
        ahead: int = 2,
    ):
        self.reader, self.requests, self.layouts, self.ahead = reader, requests, layouts, ahead
        size = max((layouts[b].most(top)[1] for b, top in micro.items()), default=0)
        self._ring = [torch.empty(size, dtype=torch.uint8) for _ in range(ring + ahead + 1)]
        self._prepared = None  # the read-ahead generator
        self._next = 0  # the iteration it yields next

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        i = info.iteration
        if i >= len(self.requests):
            raise StopIteration
        if not self.ahead:
            return self.prepare(i)
        if self._prepared is None or self._next != i:  # first call, or a new pass (DALI's reset)
            self.close()
            self._prepared = on_thread(
                lambda: (self.prepare(j) for j in range(i, len(self.requests))),
                None,
                self.ahead,
                name="megagen-dali-source",
            )
        self._next = i + 1
        return next(self._prepared)

    def close(self) -> None:
        """Stop the read-ahead thread (a later call starts a new one)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.close()

    def prepare(self, i: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Request i as DALI's two outputs' inputs."""
        request: MicroBatchRequest = self.requests[i]
        layout = self.layouts[request.bucket]
        n = len(request.sample_ids)
        c, k = layout.lanes(n)
        latents, failed = [], []
        for row, sample_id in enumerate(request.sample_ids):
            try:  # views of the map; raises DataError naming file and sample (on_error="fail")
                latents.append(self.reader.read(request.bucket, sample_id)[LATENTS])
            except SampleSkipped:
                latents.append(layout.latent_zeros)
                failed.append(row)
        pieces = [p for lat in latents for p in np.split(lat, c)] if n else [layout.latent_zeros[:0]]
        slot = self._ring[i % len(self._ring)]
        buf, _, _ = read_packed(self.reader, request, out=slot, specs=layout.rest, failed_rows=tuple(failed))
        if buf.data_ptr() != slot.data_ptr():
            raise RuntimeError(
                f"request {i}: {buf.numel()} bytes of fields do not fit the ring's {slot.numel()}"
            )
        lane = layout.rest_lane_bytes(n)
        raw = slot.numpy()
        return pieces, [raw[j * lane : (j + 1) * lane] for j in range(k)]
