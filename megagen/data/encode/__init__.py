"""`megagen data encode`: video files → TAE latents in bucketed shards (docs/data-format.md, "From videos").

One module per step: inputs (what to encode), decode (DALI, PyAV fallback), buckets and frames (fps sampling,
resize + crop), text (embeddings), shards (writing), progress (rerun and ranks), run (the
job and its summary); the TAE is megagen/specs/tae (load.py, tiling.py).
"""
