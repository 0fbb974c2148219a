"""The NVIDIA DALI shard loader: megagen's sampler drives, DALI prefetches, batches and copies to the GPU.

DALI's own readers shard and shuffle by themselves, so they cannot follow our sampler. The source is an
`fn.external_source(batch=True, batch_info=True)` whose callback returns batch i = request i, read from
the memory-mapped shards by the `ShardReader`. Two sources (`source=`, config `data.dali_source`):

- `"map"` (default; megagen/data/dali_map_source.py): the callback runs in the main process and hands DALI
  views of the memory maps (`no_copy=True`); DALI's threads copy them into its output, the batch's one
  copy. Measured at ≥ 0.8 of the raw read speed (docs/benchmarking.md).
- `"workers"`: `parallel=True`, `BatchSource` (picklable, deterministic) runs in DALI's python worker
  processes — for sources whose reads are slow enough to need processes; each batch is copied three times
  (worker buffer, DALI shared memory, DALI output), ≈ 0.2 of the raw read speed on 2 cores.

Batch mode accepts a different batch size and shape on every iteration (up to the pipeline's
`max_batch_size`), so buckets with their own micro-batch sizes and latent shapes share one pipeline. With
`device_id` set the outputs go `.gpu()` inside the pipeline (DALI's pinned staging and host-to-device
copy), are copied into CUDA tensors with DALI's torch plugin (`feed_ndarray`) and cast there: written for
GPUs, untested on the CPU-only machine.

The workers source: the worker runs `read_packed` (megagen/data/packed_batch.py: the host batch in the
stored dtypes, read straight into one buffer; with `data.on_error=skip` placeholder rows and
`sample_valid`), and the main process `to_device` (the cast to the compute dtype), so keys, dtypes and
values equal the torch loader's by construction. The worker hands DALI either that buffer (a one-sample
DALI batch: one output, one host-to-device transfer; the default for batches up to `PACK_LIMIT`, where
the per-output cost dominates) or one output per field (views of the same buffer). On the CPU the
floating fields are cast straight out of DALI's output buffer (no extra copy) and the others copied out
of it.

Worker start: `py_start_method="fork"` (default on CPU) is fast but must happen before CUDA is initialised
in the process; `"spawn"` (default when `device_id` is set) re-imports the main module in every worker, so
scripts must guard their entry point with `if __name__ == "__main__":`. Workers start when the pipeline
is built, on the first iteration (or `start()`), once per loader; `close()` stops them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from megagen.data.contract import MicroBatchRequest, micro_sizes
from megagen.data.dali_map_source import MapLayout, MapSource
from megagen.data.packed_batch import (
    SAMPLE_VALID,
    FieldSpec,
    host_specs,
    pack_layout,
    read_packed,
    read_request,
    report_skipped,
    to_device,
    unpack_batch,
)

log = logging.getLogger("megagen")

SOURCES = ("map", "workers")

PACK_LIMIT = 16 << 20
"""Pack micro-batches into one buffer when the largest one is at most this many bytes."""


class BatchSource:
    """DALI's external-source callback: batch `info.iteration` = request i, either packed (a one-sample
    batch holding the packed micro-batch) or as one array per field in `keys` order.

    Picklable (reader and indexable requests are), deterministic, stateless between calls: any worker may
    compute any batch. Raises StopIteration past the last request, which ends DALI's epoch.
    """

    def __init__(self, reader, requests, keys: tuple[str, ...], pack: bool = False):
        self.reader, self.requests, self.keys, self.pack = reader, requests, tuple(keys), pack
        self._owner, self._configured = os.getpid(), None

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        if self._configured != os.getpid() and os.getpid() != self._owner:
            # A forked worker must not enter the parent's intra-op thread pool (it hangs in the first
            # parallel torch op): one thread, as DataLoader workers do.
            torch.set_num_threads(1)
            self._configured = os.getpid()
        i = info.iteration
        if i >= len(self.requests):
            raise StopIteration
        request = self.requests[i]
        buf, specs, _ = read_packed(self.reader, request)  # the main process logs skipped samples
        if self.pack:
            return (buf.numpy()[None],)
        batch = unpack_batch(buf, specs, len(request.sample_ids))
        return tuple(np.ascontiguousarray(batch[k].numpy()) for k in self.keys)


def _indexable(requests):
    if hasattr(requests, "__getitem__") and hasattr(requests, "__len__"):
        return requests
    return list(requests)  # a finite iterable; an unbounded stream must come as an indexable object


class DaliLoader:
    """Iterating yields `(request, batch)` in the order of `requests`, like `TorchLoader`.

    `requests`: indexable (`__getitem__(i)`, `__len__`), e.g. a `RequestPlan`; a finite iterable is turned
    into a list. `num_threads`: DALI CPU threads. `prefetch_queue_depth`: batches DALI computes ahead (the
    pipeline's and the external source's queue). `py_num_workers`: python worker processes reading shards
    (0 = the callback runs in the main thread, `parallel=False`). `device_id`: None = CPU pipeline, else the
    GPU the batches land on. `pack`: hand each micro-batch over as one buffer (None = when the largest is
    at most `PACK_LIMIT` bytes). `bytes_per_sample_hint`: initial shared-memory slot per DALI sample
    (default: the largest packed batch, or the largest sample). `skipped`: samples skipped so far
    (`data.on_error=skip`; each logged, as in `TorchLoader`). `cast=False`: yield the stored dtypes, as in
    `TorchLoader`. `source`: "map" (views of the memory maps, copied by DALI's `num_threads` threads; the
    worker options do not apply) or "workers" (python worker processes; see the module docstring).
    """

    def __init__(
        self,
        reader,
        requests,
        num_threads: int = 2,
        prefetch_queue_depth: int = 2,
        py_num_workers: int = 1,
        device_id: int | None = None,
        py_start_method: str | None = None,
        pack: bool | None = None,
        bytes_per_sample_hint: int | None = None,
        cast: bool = True,
        source: str = "map",
    ):
        if source not in SOURCES:
            raise ValueError(
                f"data.dali_source: unknown source {source!r}; choose one of {', '.join(SOURCES)}"
            )
        self.reader, self.cast, self.source = reader, cast, source
        self.requests = _indexable(requests)
        self.num_threads, self.prefetch_queue_depth = num_threads, prefetch_queue_depth
        self.py_num_workers, self.device_id = py_num_workers, device_id
        self.py_start_method = py_start_method or ("fork" if device_id is None else "spawn")
        micro = micro_sizes(self.requests)
        self.specs = self._probe(micro)
        """Per bucket: (key, dtype, per-sample shape) of every batch field."""
        self.keys = tuple(k for k, _, _ in next(iter(self.specs.values()), ()))
        packed_bytes = max((pack_layout(self.specs[b], n)[1] for b, n in micro.items()), default=1)
        self.pack = packed_bytes <= PACK_LIMIT if pack is None else pack
        self.max_batch_size = 1 if self.pack else max(micro.values(), default=1)
        sample_bytes = max((pack_layout(specs, 1)[1] for specs in self.specs.values()), default=1)
        self.bytes_per_sample_hint = bytes_per_sample_hint or (packed_bytes if self.pack else sample_bytes)
        self.layouts: dict[str, MapLayout] = {}
        if source == "map":
            self.micro = micro
            self.layouts = {b: MapLayout(reader, b, num_threads) for b in micro}
            self.max_batch_size = max((self.layouts[b].most(n)[0] for b, n in micro.items()), default=1)
        self.skipped = 0
        self._source: MapSource | None = None
        self._pipe = None
        self._fresh = False  # the pipeline sits at the start of its epoch

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)

    def _probe(self, buckets) -> dict[str, tuple[FieldSpec, ...]]:
        """Each bucket's host batch fields (stored dtypes; the same for every sample of a bucket)."""
        return {bucket: host_specs(self.reader, bucket) for bucket in buckets}

    # ------------------------------------------------------------------ pipeline
    def _build(self):
        return self._build_map() if self.source == "map" else self._build_workers()

    def _build_map(self):
        from nvidia.dali import fn
        from nvidia.dali.pipeline import Pipeline

        # exec_dynamic=False: the classic executor copies no_copy inputs into its output buffers with its
        # thread pool (one task per batch sample, i.e. per lane); the dynamic one copies in the feeding thread
        pipe = Pipeline(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch_queue_depth,
            exec_dynamic=False,
        )
        ring = self.prefetch_queue_depth + 3  # > the iterations DALI holds fed but unconsumed
        source = self._source = MapSource(self.reader, self.requests, self.layouts, self.micro, ring=ring)
        with pipe:
            outs = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True, no_copy=True)
            if self.device_id is not None:  # DALI's pinned staging + host-to-device copy (untested here)
                outs = [o.gpu() for o in outs]
            pipe.set_outputs(*outs)
        pipe.build()
        return pipe

    def _build_workers(self):
        from nvidia.dali import fn
        from nvidia.dali.pipeline import Pipeline

        parallel = self.py_num_workers > 0
        pipe = Pipeline(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch_queue_depth,
            py_num_workers=max(self.py_num_workers, 1),
            py_start_method=self.py_start_method,
        )
        source = BatchSource(self.reader, self.requests, self.keys, self.pack)
        kwargs = {}
        if parallel:
            kwargs = {
                "prefetch_queue_depth": self.prefetch_queue_depth,
                "bytes_per_sample_hint": self.bytes_per_sample_hint,
            }
        with pipe:
            outs = fn.external_source(  # batch mode: the batch size may change on every iteration
                source=source,
                num_outputs=1 if self.pack else len(self.keys),
                parallel=parallel,
                batch=True,
                batch_info=True,
                **kwargs,
            )
            if self.device_id is not None:  # DALI's pinned staging + host-to-device copy (untested here)
                outs = [o.gpu() for o in outs]
            pipe.set_outputs(*outs)
        pipe.build()  # starts the python workers
        return pipe

    def start(self) -> None:
        """Build the pipeline and start its workers now (otherwise the first iteration does)."""
        if self._pipe is None:
            self._pipe = self._build()
            self._fresh = True

    def close(self) -> None:
        """Stop DALI's workers and free its buffers now; a later iteration builds a new pipeline."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        # DALI stops its python workers when the pipeline is collected (or at exit); do it now instead of
        # leaving idle worker processes behind a reference cycle.
        source, self._source = self._source, None
        if source is not None:
            source.close()
        pipe._shutdown()
        pool = getattr(pipe, "_py_pool", None)
        if pool is not None:
            pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def shm_statistics(self) -> dict:
        """DALI's shared-memory slots of the parallel external source (bytes), empty before `start()`."""
        return self._pipe.external_source_shm_statistics() if self._pipe is not None else {}

    # ------------------------------------------------------------------ iteration
    def _to_torch(self, tensor_list) -> torch.Tensor:
        """A DALI output as a torch tensor: on the CPU a view of DALI's buffer (valid until the next
        `run()`), on the GPU a copy into a CUDA tensor (DALI's torch plugin)."""
        dense = tensor_list.as_tensor()
        if self.device.type == "cpu":
            return torch.from_numpy(np.asarray(dense))
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        return feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))

    def _batch(self, request: MicroBatchRequest, outputs) -> dict[str, torch.Tensor]:
        """DALI's outputs of `request` → the batch (compute dtype, owning its memory); logs and counts skipped
        samples."""
        if self.source == "map":
            n = len(request.sample_ids)
            host = self.layouts[request.bucket].unpack(
                self._to_torch(outputs[0]), self._to_torch(outputs[1]), n
            )
        elif self.pack:
            buf = self._to_torch(outputs[0])[0]
            host = unpack_batch(buf, self.specs[request.bucket], len(request.sample_ids))
        else:
            host = {k: self._to_torch(t) for k, t in zip(self.keys, outputs)}
        # On the CPU the outputs are DALI's buffers, reused by the next `run()`: cast=True copies (the cast,
        # and clones of the other fields); cast=False yields views, valid until the next batch is requested.
        owned = self.device.type != "cpu" or not self.cast
        batch = to_device(host, self.device, owned=owned, cast=self.cast)
        valid = batch.get(SAMPLE_VALID)
        if valid is not None and not bool(valid.all()):
            missing = [i for i, ok in zip(request.sample_ids, valid.tolist()) if not ok]
            self.skipped += len(missing)
            report_skipped(request, [self._reason(request.bucket, i) for i in missing])
        return batch

    def _reason(self, bucket: str, sample_id: int) -> str:
        """Why a DALI worker left a sample out (re-read here: the worker cannot pass the message)."""
        try:
            self.reader.read(bucket, sample_id)
        except Exception as exc:  # reported, not handled
            return str(exc)
        return f"sample {sample_id} of bucket {bucket} (unusable in a DALI worker)"

    def _raise_data_error(self, i: int, exc: Exception) -> None:
        """A worker failed (DALI wraps its exception in a plain one): re-read the batches that may have been
        in flight here, so the reader's own DataError, naming file and sample, reaches the caller."""
        ahead = self.prefetch_queue_depth * (1 + max(self.py_num_workers, 1)) + 1
        for j in range(i, min(i + ahead, len(self.requests))):
            try:
                read_request(self.reader, self.requests[j])
            except Exception as data_error:
                raise data_error from exc

    def __iter__(self) -> Iterator[tuple[MicroBatchRequest, dict[str, torch.Tensor]]]:
        if not len(self.requests):
            return
        if self._pipe is not None and not self._fresh:
            self.close()  # a previous pass stopped early with batches of it queued in DALI: start over
        self.start()
        self._fresh = False
        if self.device.type == "cpu" and self.cast:
            # run the pipeline and convert on a thread (the cast copies each batch out of DALI's buffers,
            # so running ahead is safe): the consumer only dequeues
            from megagen.data.read_ahead import on_thread

            pipe = self._pipe
            yield from on_thread(
                lambda: self._batches(pipe), None, self.prefetch_queue_depth, name="megagen-dali-ahead"
            )
        else:  # device outputs stay on the consumer's thread (its CUDA stream); uncast views live until
            # the next batch is requested
            yield from self._batches(self._pipe)

    def _batches(self, pipe) -> Iterator[tuple[MicroBatchRequest, dict[str, torch.Tensor]]]:
        """One pass over the requests: run the pipeline once per batch, then let DALI end its epoch."""
        for i in range(len(self.requests)):
            try:
                outputs = pipe.run()
            except StopIteration as e:
                raise RuntimeError(f"the DALI source stopped at batch {i} of {len(self.requests)}") from e
            except Exception as e:
                self.close()  # DALI invalidates a pipeline whose source failed
                self._raise_data_error(i, e)
                raise
            request = self.requests[i]
            yield request, self._batch(request, outputs)
        try:  # let DALI reach the end of its epoch, then rewind so that the next pass starts at request 0
            pipe.run()
        except StopIteration:
            pipe.reset()
            self._fresh = True
        else:
            raise RuntimeError(f"the DALI source yielded more than {len(self.requests)} batches")
