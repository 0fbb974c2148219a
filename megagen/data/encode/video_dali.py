"""DALI video decoding: the bytes of one clip in, its frames out (CPU backend, or "mixed" on a GPU).

One pipeline is kept and fed through `external_source`; DALI leaves a pipeline unusable after an error, so a
failed clip rebuilds it. The queue depth is 1: with prefetching, a clip's output could come back for the
next one.
"""

from __future__ import annotations

import numpy as np

ALL_FRAMES = 2**31 - 1


def dali_video_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliVideoDecoder:
    """`decode(path)` → (N, H, W, 3) uint8 numpy frames; raises whatever DALI raises for a clip it refuses.

    Only the frames up to `max_frames` are decoded, so a long clip costs the memory of what is used."""

    def __init__(self, device_id: int | None = None):
        self.device_id = device_id
        """None: the CPU backend; a CUDA device: the mixed backend (decoded on the GPU, copied back)."""
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        backend = "cpu" if self.device_id is None else "mixed"

        @pipeline_def(
            batch_size=1, num_threads=1, device_id=self.device_id, exec_dynamic=True, prefetch_queue_depth=1
        )
        def one_clip():
            data = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
            end = fn.external_source(name="end", dtype=types.INT32, ndim=0)
            # pad_mode "none": a clip shorter than `end` comes back short (so truncation shows), not padded
            return fn.decoders.video(data, device=backend, end_frame=end, pad_mode="none")

        pipe = one_clip()
        pipe.build()
        return pipe

    def decode(self, path: str, max_frames: int | None = None) -> np.ndarray:
        """The clip's first `max_frames` frames (all when None), decoded and nothing after them."""
        if self._pipe is None:
            self._pipe = self._build()
        end = np.array(min(max_frames or ALL_FRAMES, ALL_FRAMES), dtype=np.int32)
        try:
            self._pipe.feed_input("video", [np.fromfile(path, dtype=np.uint8)])
            self._pipe.feed_input("end", [end])
            (out,) = self._pipe.run()
        except Exception:
            self._pipe = None
            raise
        if self.device_id is not None:
            out = out.as_cpu()
        return np.array(out[0])
