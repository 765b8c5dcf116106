"""One tensor in a .npy or .safetensors file, read a slice of rows at a time.

`saecache import` reads activations (and token ids) made elsewhere through :func:`open_tensor`.
A .npy file is memory-mapped (``np.load(mmap_mode="r")``) and a .safetensors tensor is sliced
with ``safe_open(...).get_slice``, so only the rows asked for are ever in memory. The format is
the file's suffix, looked up in :data:`FORMATS`; ``FILE.safetensors:NAME`` names one tensor of a
file that holds several. numpy has no bfloat16, so bfloat16 comes in .safetensors files only.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from saecache.core.errors import SaecacheError, first_line

_NPY_MAGIC = b"\x93NUMPY"
# safetensors' dtype codes → the names numpy and torch give the same dtypes.
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                       "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                       "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64"}


class TensorFile(ABC):
    """One tensor of a file: its shape and dtype from the header, its rows on demand."""

    suffix: ClassVar[str]
    """The file name suffix this format is chosen by."""

    def __init__(self, path: Path, name: str | None):
        self.path = path
        self.name = name
        """The tensor's name inside the file (None: the file's only tensor)."""
        self.shape: tuple[int, ...] = ()
        self.dtype: str = ""
        """numpy/torch name of the stored dtype: float16, bfloat16, float32, int64…"""

    @property
    def label(self) -> str:
        """How messages and the provenance name it: ``acts.safetensors:blocks.5``."""
        return self.path.name + (f":{self.name}" if self.name else "")

    @abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along the first axis, in the stored dtype (read now, nothing more)."""

    def sha256(self) -> str:
        """Hex sha256 of the whole file, read a buffer at a time."""
        with open(self.path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()


class NpyFile(TensorFile):
    """A ``.npy`` array, memory-mapped."""

    suffix = ".npy"

    def __init__(self, path: Path, name: str | None):
        super().__init__(path, name)
        if name is not None:
            raise SaecacheError(f"{path}:{name}: a .npy file holds one array; drop ':{name}'")
        with open(path, "rb") as f:
            if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:  # np.load would try it as a pickle
                raise SaecacheError(f"{path} is not a .npy file (it does not start with the NUMPY magic)")
        self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        self.shape, self.dtype = tuple(self.array.shape), _numpy_dtype_name(self.array.dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        block = self.array[start:stop]  # a view of the map: nothing read yet
        native = block.dtype.newbyteorder("=")  # torch takes native byte order only
        return torch.from_numpy(np.array(block, dtype=native))  # reads (copies) these rows only


def _numpy_dtype_name(dtype: np.dtype) -> str:
    """float16, int64…; a void or structured dtype (how an extension's bfloat16 is saved) as such."""
    return dtype.name if dtype.kind in "fiub" else f"{dtype.name} ({dtype.str})"


class SafetensorsFile(TensorFile):
    """One tensor of a ``.safetensors`` file, sliced from its memory map."""

    suffix = ".safetensors"

    def __init__(self, path: Path, name: str | None):
        super().__init__(path, name)
        self.file = safe_open(str(path), framework="pt")
        names = list(self.file.keys())
        if name is None and len(names) != 1:
            raise SaecacheError(f"{path} holds {len(names)} tensors ({', '.join(names[:8]) or 'none'}):"
                                f" name one as {path}:NAME")
        if name is not None and name not in names:
            raise SaecacheError(f"{path} has no tensor {name!r}; it holds {', '.join(names[:8])}")
        self.slice = self.file.get_slice(name or names[0])
        code = self.slice.get_dtype()
        self.shape, self.dtype = tuple(self.slice.get_shape()), _SAFETENSORS_DTYPES.get(code, code)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.slice[start:stop]


FORMATS: dict[str, type[TensorFile]] = {cls.suffix: cls for cls in (NpyFile, SafetensorsFile)}
"""File suffix → the class that reads that format."""


def split_spec(text: str) -> tuple[Path, str | None]:
    """``acts.safetensors:blocks.5`` → (acts.safetensors, "blocks.5"); anything else → (path, None)."""
    head, sep, name = text.rpartition(":")
    if sep and head.lower().endswith(".safetensors") and name:
        return Path(head), name
    return Path(text), None


def open_tensor(text: str) -> TensorFile:
    """The tensor ``text`` names (FILE or FILE.safetensors:NAME); one-line errors for a missing,
    unreadable or unknown file. Reads the header only."""
    path, name = split_spec(text)
    if not path.is_file():
        raise SaecacheError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}"
                            "; give a .npy or .safetensors file")
    reader = FORMATS.get(path.suffix.lower())
    if reader is None:
        raise SaecacheError(f"{path}: {path.suffix or 'no suffix'} is not a format saecache import "
                            f"reads; give a {' or '.join(FORMATS)} file")
    try:
        return reader(path, name)
    except (OSError, ValueError, SafetensorError) as err:
        raise SaecacheError(f"{path} is not a readable {reader.suffix} file "
                            f"({type(err).__name__}: {first_line(err)})") from None
