"""Documents from a Hugging Face dataset id (streamed) or a local file, folder or saved dataset."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from saecache.core.errors import SaecacheError, first_line
from saecache.core.settings import setting

# The Pile, minus its copyrighted subsets, as still hosted on the Hub (the original
# EleutherAI/pile was taken down). Pythia was trained on the full Pile.
DEFAULT_DATASET = "monology/pile-uncopyrighted"

# Local file suffix → datasets' packaged builder.
BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class DatasetSpec:
    """Which documents to read."""

    id: str = setting(DEFAULT_DATASET, flag="--dataset", metavar="ID|PATH")
    """Hub dataset id (streamed) or a local .jsonl/.txt/.parquet file, folder or saved dataset."""
    config: str | None = setting(None, flag="--dataset-config")
    """Dataset configuration name."""
    split: str = "train"
    """Dataset split."""
    revision: str | None = setting(None, flag="--dataset-revision")
    """Dataset revision on the Hub."""
    text_field: str = "text"
    """Column holding the text."""

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.id) or _looks_like_path(self.id)

    def canonical_id(self) -> str:
        """What provenance records: an absolute path for local data, the Hub id otherwise."""
        return str(Path(self.id).expanduser().resolve()) if self.is_local else self.id


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in BUILDERS


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a folder of files of one supported kind."""
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise SaecacheError(f"dataset file {path} is not .jsonl, .json, .txt or .parquet")
        return BUILDERS[path.suffix], [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    kinds = {BUILDERS[p.suffix] for p in files}
    if len(kinds) != 1:
        found = "no .jsonl, .txt or .parquet files" if not kinds else "files of several kinds"
        raise SaecacheError(f"dataset folder {path} holds {found}: give one file or a folder of one kind")
    return kinds.pop(), [str(p) for p in files]


def _open_local(spec: DatasetSpec):
    import datasets

    path = Path(spec.id).expanduser()
    if not path.exists():
        raise SaecacheError(f"dataset path {spec.id} does not exist")
    if path.is_dir() and any((path / m).exists() for m in SAVED_MARKERS):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if spec.split not in saved:
                raise SaecacheError(f"saved dataset {path} has no split {spec.split!r} "
                                    f"(it has {', '.join(saved)}): pass --split")
            saved = saved[spec.split]
        return saved.to_iterable_dataset()
    builder, files = _local_files(path)
    if all(os.path.getsize(f) == 0 for f in files):
        raise SaecacheError(f"dataset {spec.id} is empty: give a file or folder with text in it")
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
    except Exception as err:  # e.g. an empty or malformed file
        raise SaecacheError(f"could not read dataset {spec.id}: {first_line(err)}") from None
    if builder == "text":  # a paragraph keeps the newlines around it; they are not its text
        stream = stream.map(lambda row: {"text": row["text"].strip("\n")})
    return stream


def _open_hub(spec: DatasetSpec):
    import datasets

    try:
        return datasets.load_dataset(spec.id, name=spec.config, split=spec.split,
                                     revision=spec.revision, streaming=True)
    except Exception as err:  # the Hub client raises many types; all mean "cannot read it"
        raise SaecacheError(f"could not open dataset {spec.id!r} on the Hugging Face Hub: {first_line(err)} "
                            "(check the id and the network, or pass a local file)") from None


def iter_texts(spec: DatasetSpec) -> Iterator[str]:
    """The documents' texts in dataset order (streamed: nothing is downloaded in full)."""
    stream = _open_local(spec) if spec.is_local else _open_hub(spec)
    rows = iter(stream)
    for index in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # datasets' readers fail in many ways on bad or empty files
            raise SaecacheError(f"could not read dataset {spec.id} at row {index}: "
                                f"{first_line(err)}") from None
        yield _text_of(row, spec, index)


def _text_of(row: dict, spec: DatasetSpec, index: int) -> str:
    if spec.text_field not in row:
        raise SaecacheError(f"dataset {spec.id} has no column {spec.text_field!r} "
                            f"(it has {', '.join(row)}): pass --text-field")
    text = row[spec.text_field]
    if not isinstance(text, str):
        raise SaecacheError(f"column {spec.text_field!r} of dataset {spec.id} holds "
                            f"{type(text).__name__}, not text (row {index})")
    return text
