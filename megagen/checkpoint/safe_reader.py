"""Reading DCP checkpoints without executing code from the files.

DCP stores its index (`.metadata`) as a pickle and reads it with `pickle.load`, which runs whatever a
crafted file asks for. `SafeFileSystemReader` unpickles it with an allow-list of the few plain data
classes DCP's index is made of; anything else is refused with an error naming the file. Tensor data is
read by DCP itself with `torch.load(weights_only=True)`. DCP's "bytes" entries, though, are unpickled with
`torch.load(weights_only=False)`: megagen never writes one (non-tensor state goes to JSON), so an index
that has one is refused here, naming the key — every reader (resume, init_from, `ckpt info|export|average`,
`megagen sample`) gets its index through `load_dcp_metadata` — and `read_data` refuses to read one anyway.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType

from megagen.checkpoint.layout import CheckpointError

_DCP_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", n) for n in _DCP_METADATA_CLASSES),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_dcp_metadata(data: bytes, key: str, path: str) -> Metadata:
    try:
        meta = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable index
        raise CheckpointError(key, f"{path} is not a valid DCP index: {exc}") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(key, f"{path} holds {type(meta).__name__}, not a DCP index")
    entries = meta.state_dict_metadata
    if not isinstance(entries, dict):
        raise CheckpointError(key, f"{path} is not a valid DCP index: no table of entries")
    for fqn, md in entries.items():
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(
                key,
                f"{path}: entry {fqn!r} is a pickled object ({type(md).__name__}), not a tensor; "
                "megagen never saves one and refuses to unpickle it",
            )
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", "")
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel.startswith("."):
            raise CheckpointError(key, f"{path} names a data file outside the checkpoint: {rel!r}")
    return meta


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose index is read with the allow-listed unpickler."""

    def __init__(self, path, key: str = "checkpoint"):
        super().__init__(path)
        self._key = key

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        meta = load_dcp_metadata(path.read_bytes(), self._key, str(path))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan, planner):
        for item in plan.items:  # the index was checked; a second lock on the one unsafe door
            if item.type == LoadItemType.BYTE_IO:
                fqn = item.dest_index.fqn
                raise CheckpointError(self._key, f"{self.path}: refusing to unpickle entry {fqn!r}")
        return super().read_data(plan, planner)


def read_index(ckpt: Path, key: str) -> Metadata:
    """The DCP index of a checkpoint directory (tensor names, global shapes, dtypes)."""
    return SafeFileSystemReader(ckpt, key).read_metadata()
