"""Text embeddings per clip: pre-computed files, or a Hugging Face encoder run on the caption.

Each encoder name becomes the dataset's `text.<name>` field (the video spec reads ul2, byt5 and metaclip).
A name given with `--text-encoder NAME=DIR` is computed from the caption with a `transformers` T5 encoder
and its tokenizer loaded from the local DIR (never downloaded); every other name comes from the clip's
pre-computed (L, D) files (.npy / .safetensors: no pickle). Embeddings longer than `max_len` tokens are cut
to it, so every rank pads to the same length without a pass over the data first.
"""

from __future__ import annotations

import numpy as np
import torch

from megagen.data.encode.inputs import EncodeInput
from megagen.data.encode.video_pyav import BadVideo
from megagen.data.format import DataError
from megagen.data.pack_sources import load_array, probe_array

DEFAULT_ENCODER_NAME = "ul2"
"""The name of a `--text-encoder DIR` given without one (Movie Gen's UL2 is a T5 encoder)."""


def parse_text_encoders(values: list[str]) -> dict[str, str]:
    """`["NAME=DIR", "DIR"]` → {name: dir}; a bare DIR is the `ul2` encoder."""
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = (name, path) if sep else (DEFAULT_ENCODER_NAME, v)
        if name in out:
            raise ValueError(f"text encoder {name!r} is given twice")
        out[name] = path
    return out


class TextEmbedder:
    """`embed(input)` → {encoder: (L ≤ max_len, D) float32}; BadVideo("no_text") for a clip lacking one."""

    def __init__(self, inputs: list[EncodeInput], model_dirs: dict[str, str], max_len: int, device="cpu"):
        if max_len < 1:
            raise ValueError(f"text length must be at least 1, got {max_len}")
        self.max_len, self.device = max_len, torch.device(device)
        self.models = {name: _load_encoder(path, self.device) for name, path in model_dirs.items()}
        stored = sorted({enc for i in inputs for enc in i.text_files} - set(self.models))
        self.dims = {name: model.config.d_model for name, (model, _) in self.models.items()}
        for enc in stored:
            first = next(i.text_files[enc] for i in inputs if enc in i.text_files)
            shape, _ = probe_array(first, ("text", enc))
            if len(shape) != 2:
                raise DataError(f"text.{enc} is {list(shape)}; expected (tokens, width)", file=first)
            self.dims[enc] = shape[1]
        if not self.dims:
            raise ValueError("no text: give --text-encoder NAME=DIR or pre-computed embedding files")
        self.dims = dict(sorted(self.dims.items()))

    def embed(self, inp: EncodeInput) -> dict[str, np.ndarray]:
        out = {}
        for enc, dim in self.dims.items():
            emb = self._computed(enc, inp) if enc in self.models else self._stored(enc, inp)
            if emb.ndim != 2 or emb.shape[1] != dim or not len(emb):
                raise BadVideo("bad_text", f"text.{enc} is {list(emb.shape)}, expected (tokens, {dim})")
            out[enc] = emb[: self.max_len].astype(np.float32)
        return out

    def _stored(self, enc: str, inp: EncodeInput) -> np.ndarray:
        if enc not in inp.text_files:
            raise BadVideo("no_text", f"no pre-computed text.{enc} embedding")
        try:
            return load_array(inp.text_files[enc], ("text", enc))
        except DataError as exc:
            raise BadVideo("bad_text", str(exc)) from None

    @torch.no_grad()
    def _computed(self, enc: str, inp: EncodeInput) -> np.ndarray:
        if not inp.caption:
            raise BadVideo("no_text", f"no caption for the {enc} encoder")
        model, tokenizer = self.models[enc]
        tokens = tokenizer(inp.caption, truncation=True, max_length=self.max_len, return_tensors="pt")
        hidden = model(input_ids=tokens["input_ids"].to(self.device)).last_hidden_state
        return hidden[0].float().cpu().numpy()


def _load_encoder(path: str, device: torch.device):
    """A T5 encoder and its tokenizer from a local directory (local_files_only: nothing is downloaded)."""
    from transformers import AutoTokenizer, T5EncoderModel

    model = T5EncoderModel.from_pretrained(path, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
