"""`megagen data pack`'s inputs: the source arrays (.npy / .safetensors), metadata.jsonl, and the probe
that checks the whole source is one consistent dataset before anything is written.

The probe reads only array headers, so a bad sample is named (id, metadata line, file) in seconds, not
after hours of packing. See docs/data-format.md, section "Packing".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megagen.data.format import LATENTS, SCALAR_FIELDS, TEXT_LEN_PREFIX, TEXT_PREFIX, DataError
from megagen.data.shard_format import NUMPY_TO_SAFETENSORS, SAFETENSORS_DTYPES

METADATA_NAME = "metadata.jsonl"
LATENT_TENSOR_NAMES = ("latents", "latent")
"""In a multi-tensor .safetensors latent file, the tensor to take."""


# ---------------------------------------------------------------------------------------------------------
# Source arrays


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _pick_tensor(path: str, names: list[str], preferred: tuple[str, ...]) -> str:
    if len(names) == 1:
        return names[0]
    for n in preferred:
        if n in names:
            return n
    raise DataError(
        f"holds tensors {names}; expected exactly one or one named {' / '.join(preferred)}", file=path
    )


def probe_array(path: str, preferred: tuple[str, ...] = ()) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a source array without reading its data. DataError naming the file."""
    if path.endswith(".npy"):
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError("file is missing", file=path) from None
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read .npy: {exc}", file=path) from None
        return tuple(a.shape), a.dtype.name
    if path.endswith(".safetensors"):
        if not os.path.exists(path):
            raise DataError("file is missing", file=path)
        header = _raw_safetensors_header(path)
        name = _pick_tensor(path, list(header), preferred)
        code = header[name]["dtype"]
        return tuple(header[name]["shape"]), "bfloat16" if code == "BF16" else _st_dtype(code, path)
    raise DataError("unsupported array file type (use .npy or .safetensors)", file=path)


def _st_dtype(code: str, path: str) -> str:
    if code not in SAFETENSORS_DTYPES:
        raise DataError(f"unsupported safetensors dtype {code}", file=path)
    return SAFETENSORS_DTYPES[code]


def _raw_safetensors_header(path: str) -> dict[str, Any]:
    # The source may hold BF16, which the shard parser (numpy dtypes only) rejects; read the header plainly.
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > 100 * 1024 * 1024:
            raise DataError("not a safetensors file", file=path)
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise DataError(f"bad safetensors header: {exc}", file=path) from None
    header.pop("__metadata__", None)
    return header


def load_array(path: str, preferred: tuple[str, ...] = ()) -> np.ndarray:
    """A source array as numpy (bfloat16 widened to float32). DataError naming the file."""
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read .npy: {exc}", file=path) from None
    header = _raw_safetensors_header(path)
    name = _pick_tensor(path, list(header), preferred)
    entry = header[name]
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n + begin)
        raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise DataError("truncated safetensors file", file=path)
    if entry["dtype"] == "BF16":
        return _bf16_to_f32(np.frombuffer(raw, dtype="<u2")).reshape(entry["shape"])
    dtype = np.dtype(_st_dtype(entry["dtype"], path)).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(entry["shape"]).copy()


# ---------------------------------------------------------------------------------------------------------
# The source listing


@dataclass
class SourceSample:
    """One line of metadata.jsonl, and what probing and bucketing learn about it."""

    line: int
    id: str
    latent: str
    text: dict[str, str]
    fps: float
    duration: float
    caption_id: int
    fields: dict[str, str]
    latent_shape: tuple[int, ...] = ()
    raw_latent_shape: tuple[int, ...] = ()
    text_lens: dict[str, int] = field(default_factory=dict)
    extra_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    thw: tuple[int, int, int] = (0, 0, 0)
    bucket: str = ""


def _number(rec: dict, key: str, default: float, where: str, integer: bool = False):
    v = rec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise DataError(f"{where}: {key!r} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not math.isfinite(v):
        raise DataError(f"{where}: {key!r} is not finite")
    return v


def _parse_record(rec: Any, where: str, ids: set[str], resolve) -> SourceSample | None:
    """One metadata.jsonl object → a SourceSample (paths resolved against SRC); DataError naming the line."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: not a JSON object")
    sid = rec.get("id")
    if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or integer")
    sid = str(sid)
    where = f"{where} (sample {sid})"
    if sid in ids:
        raise DataError(f"{where}: id is repeated")
    ids.add(sid)
    text = rec.get("text")
    if not isinstance(text, dict) or not text:
        raise DataError(f"{where}: 'text' must map each text encoder to an embedding file")
    extra = rec.get("fields") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{where}: 'fields' must be an object")
    for name in extra:
        if name == LATENTS or name in SCALAR_FIELDS or name.startswith((TEXT_PREFIX, TEXT_LEN_PREFIX)):
            raise DataError(f"{where}: extra field {name!r} collides with a standard field")
    return SourceSample(
        line=0,
        id=sid,
        latent=resolve(rec.get("latent"), where, "'latent'"),
        text={str(k): resolve(v, where, f"text.{k}") for k, v in text.items()},
        fps=float(_number(rec, "fps", 0.0, where)),
        duration=float(_number(rec, "duration", 0.0, where)),
        caption_id=int(_number(rec, "caption_id", -1, where, integer=True)),
        fields={str(k): resolve(v, where, f"fields.{k}") for k, v in extra.items()},
    )


def read_metadata(src: str) -> list[SourceSample]:
    """Every sample SRC/metadata.jsonl lists, in file order (blank lines skipped)."""
    path = os.path.join(src, METADATA_NAME)
    if not os.path.exists(path):
        raise DataError(f"no {METADATA_NAME} (one JSON object per sample)", file=path)
    out: list[SourceSample] = []
    ids: set[str] = set()

    def resolve(p: Any, where: str, what: str) -> str:
        if not isinstance(p, str) or not p:
            raise DataError(f"{where}: {what} must be a path string, got {p!r}")
        return p if os.path.isabs(p) else os.path.join(src, p)

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}: not valid JSON ({exc})") from None
            sample = _parse_record(rec, where, ids, resolve)
            sample.line = lineno
            out.append(sample)
    if not out:
        raise DataError("lists no samples", file=path)
    return out


def parse_max_len(text: str | int | dict | None) -> int | dict[str, int] | None:
    """`256` (every encoder) or `ul2=256,byt5=128` → int or dict; None/'' → None."""
    if text is None or text == "" or isinstance(text, (int, dict)):
        return text or None
    text = str(text).strip()
    if "=" not in text:
        return int(text)
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = int(v)
    return out


# ---------------------------------------------------------------------------------------------------------
# Probing: one consistent dataset


@dataclass
class SourceLayout:
    """What every sample must share: text encoders (and their dims), extra fields (and their dtypes),
    latent channels and rank. Set from the first sample; each later one is checked against it."""

    encoders: list[str]
    extra_names: list[str]
    channels: int | None = None
    latent_rank: int | None = None
    text_dims: dict[str, int] = field(default_factory=dict)
    extra_dtypes: dict[str, str] = field(default_factory=dict)


def _where(s: SourceSample) -> str:
    return f"sample {s.id} ({METADATA_NAME}:{s.line})"


def _probe_latent(s: SourceSample, layout: SourceLayout) -> None:
    where = _where(s)
    shape, dtype = probe_array(s.latent, LATENT_TENSOR_NAMES)
    s.raw_latent_shape = tuple(shape)
    if len(shape) == 3:
        shape = (shape[0], 1, *shape[1:])
    if len(shape) not in (2, 4) or min(shape) < 1 or not dtype.startswith(("float", "bfloat")):
        raise DataError(
            f"{where}: latent is {list(shape)} {dtype}; expected a float (C, T, H, W), (C, H, W) or (C, T)",
            file=s.latent,
        )
    layout.latent_rank = len(shape) if layout.latent_rank is None else layout.latent_rank
    if len(shape) != layout.latent_rank:
        raise DataError(
            f"{where}: latent is {list(shape)} but earlier samples are {layout.latent_rank}-D: a dataset "
            "holds either 1-D (C, T) or video/image latents",
            file=s.latent,
        )
    layout.channels = shape[0] if layout.channels is None else layout.channels
    if shape[0] != layout.channels:
        raise DataError(
            f"{where}: latent has {shape[0]} channels, earlier samples {layout.channels}", file=s.latent
        )
    s.latent_shape = shape


def _probe_text(s: SourceSample, layout: SourceLayout) -> None:
    where = _where(s)
    for enc, p in s.text.items():
        tshape, tdtype = probe_array(p, ("text", enc))
        if len(tshape) != 2 or tshape[1] < 1 or not tdtype.startswith(("float", "bfloat")):
            raise DataError(f"{where}: text.{enc} is {list(tshape)} {tdtype}; expected float (L, D)", file=p)
        layout.text_dims.setdefault(enc, tshape[1])
        if tshape[1] != layout.text_dims[enc]:
            raise DataError(
                f"{where}: text.{enc} has dim {tshape[1]}, earlier samples {layout.text_dims[enc]}", file=p
            )
        s.text_lens[enc] = tshape[0]


def _probe_fields(s: SourceSample, layout: SourceLayout) -> None:
    where = _where(s)
    for name, p in s.fields.items():
        fshape, fdtype = probe_array(p, (name,))
        fdtype = "float32" if fdtype == "bfloat16" else fdtype
        if fdtype not in NUMPY_TO_SAFETENSORS:
            raise DataError(f"{where}: field {name!r} has unsupported dtype {fdtype}", file=p)
        if layout.extra_dtypes.setdefault(name, fdtype) != fdtype:
            raise DataError(
                f"{where}: field {name!r} is {fdtype}, earlier samples {layout.extra_dtypes[name]}", file=p
            )
        s.extra_shapes[name] = tuple(fshape)


def probe_sources(sources: list[SourceSample]) -> SourceLayout:
    """Probe every array's shape (headers only) and check that the samples form one dataset; fills each
    sample's shapes and text lengths. DataError naming the first inconsistent sample and file."""
    layout = SourceLayout(list(sources[0].text), sorted(sources[0].fields))
    for s in sources:
        if list(s.text) != layout.encoders:
            raise DataError(
                f"{_where(s)}: text encoders {list(s.text)} differ from the first sample's {layout.encoders}"
            )
        if sorted(s.fields) != layout.extra_names:
            raise DataError(
                f"{_where(s)}: extra fields {sorted(s.fields)} differ from the first sample's "
                f"{layout.extra_names}"
            )
        _probe_latent(s, layout)
        _probe_text(s, layout)
        _probe_fields(s, layout)
    return layout
