"""Reading documents (saecache.harvest.corpus) and packing them into sequences (saecache.harvest.packing), offline."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from saecache.harvest import packing
from saecache.harvest.corpus import DatasetSpec, iter_texts
from saecache.core.errors import SaecacheError
from saecache.harvest.packing import pack, tokenize_documents
from saecache.demo.tiny import DEMO_TEXT

# Documents a .txt file can hold too: no blank line inside one, no newline at either end.
DOCS = [
    "The first document.\nIt has a second line.",
    "Second: ünïcödé, “quotes” — and an emoji 🙂!",
    "3",
    "  leading spaces and a tab\there",
    " ".join(["a longer document"] * 20),
    "sixth",
]


def texts(path, **spec) -> list[str]:
    return list(iter_texts(DatasetSpec(str(path), **spec)))


def message(excinfo) -> str:
    """The error's text, checked to be the one line the CLI prints."""
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# ---- writers: the same documents in every supported local format ----------------------------


def write_jsonl(path: Path, docs: list[str], field: str = "text", **extra_columns) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            row = {"id": i, field: doc, **{k: v[i] for k, v in extra_columns.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def as_jsonl(tmp: Path, docs, field="text", **extra) -> Path:
    return write_jsonl(tmp / "docs.jsonl", docs, field, **extra)


def as_txt(tmp: Path, docs, field="text", **extra) -> Path:
    assert field == "text" and not extra  # a .txt file has one column
    path = tmp / "docs.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def as_parquet(tmp: Path, docs, field="text", **extra) -> Path:
    path = tmp / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs, **extra}), path)
    return path


def as_jsonl_folder(tmp: Path, docs, field="text", **extra) -> Path:
    folder = tmp / "shards"
    folder.mkdir()
    cuts = [0, 2, 3, 4, 5, len(docs)]
    # Five shards written out of order: the order must come from the names, not from the
    # directory listing (hash order on ext4, which three names may match by chance).
    for i in (3, 1, 4, 0, 2):
        part = slice(cuts[i], cuts[i + 1])
        write_jsonl(folder / f"part-{i:02d}.jsonl", docs[part], field,
                    **{k: v[part] for k, v in extra.items()})
    return folder


def as_saved(tmp: Path, docs, field="text", **extra) -> Path:
    path = tmp / "saved"
    datasets.Dataset.from_dict({field: docs, **extra}).save_to_disk(str(path))
    return path


FORMATS = {"jsonl": as_jsonl, "txt": as_txt, "parquet": as_parquet,
           "jsonl-folder": as_jsonl_folder, "saved": as_saved}
COLUMNAR = {k: v for k, v in FORMATS.items() if k != "txt"}


# ---- iter_texts --------------------------------------------------------------------------------


@pytest.mark.parametrize("write", FORMATS.values(), ids=FORMATS.keys())
def test_every_format_yields_the_same_documents_in_order(tmp_path, write):
    assert texts(write(tmp_path, DOCS)) == DOCS


def test_txt_paragraphs_keep_their_single_newlines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one\ntwo\n\nthree\n\nfour\nfive", encoding="utf-8")
    assert texts(path) == ["one\ntwo", "three", "four\nfive"]


def test_txt_final_newline_is_not_part_of_the_last_document(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    assert texts(path) == DOCS


@pytest.mark.parametrize("write", COLUMNAR.values(), ids=COLUMNAR.keys())
def test_text_field_picks_another_column(tmp_path, write):
    decoys = [f"decoy {i}" for i in range(len(DOCS))]
    path = write(tmp_path, DOCS, field="body", text=decoys)
    assert texts(path, text_field="body") == DOCS
    assert texts(path) == decoys


def test_saved_dataset_dict_reads_the_chosen_split(tmp_path):
    path = tmp_path / "dict"
    train = [f"train doc {i}" for i in range(3)]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train}),
        "validation": datasets.Dataset.from_dict({"text": DOCS}),
    }).save_to_disk(str(path))
    assert texts(path, split="validation") == DOCS
    assert texts(path) == train  # the default split is train


def test_saved_dataset_dict_without_the_split_is_refused(tmp_path):
    path = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(path))
    with pytest.raises(SaecacheError) as excinfo:
        texts(path, split="test")
    assert "'test'" in message(excinfo)


@pytest.mark.parametrize("write", COLUMNAR.values(), ids=COLUMNAR.keys())
def test_missing_text_column_is_refused(tmp_path, write):
    path = write(tmp_path, DOCS)
    with pytest.raises(SaecacheError) as excinfo:
        texts(path, text_field="body")
    assert "'body'" in message(excinfo)


@pytest.mark.parametrize("name", ["absent.jsonl", "absent.txt", "absent_folder/"])
def test_missing_path_is_refused(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(SaecacheError) as excinfo:
        texts(path)
    assert str(path) in message(excinfo)


@pytest.mark.parametrize("contents", [[], ["README.md", "data.csv"]], ids=["empty", "unsupported"])
def test_folder_without_supported_files_is_refused(tmp_path, contents):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in contents:
        (folder / name).write_text("text,here\n")
    with pytest.raises(SaecacheError) as excinfo:
        texts(folder)
    assert str(folder) in message(excinfo)


def test_folder_mixing_kinds_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", DOCS[:2])
    (folder / "b.txt").write_text(DOCS[2])
    with pytest.raises(SaecacheError) as excinfo:
        texts(folder)
    assert str(folder) in message(excinfo)


def test_unsupported_file_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(SaecacheError) as excinfo:
        texts(path)
    assert str(path) in message(excinfo)


def test_non_text_column_is_refused(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 7}\n')
    with pytest.raises(SaecacheError) as excinfo:
        texts(path)
    assert "'text'" in message(excinfo) and "row 1" in message(excinfo)


def test_hub_id_that_cannot_be_reached_is_one_line_naming_it():
    with pytest.raises(SaecacheError) as excinfo:  # tests run with HF_DATASETS_OFFLINE=1
        texts("nobody/no-such-dataset")
    assert "'nobody/no-such-dataset'" in message(excinfo)


def test_canonical_id_of_a_home_path_is_the_file_read(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    spec = DatasetSpec("~/docs.jsonl")
    assert list(iter_texts(spec)) == DOCS  # reading expands ~ ...
    assert spec.canonical_id() == str((tmp_path / "docs.jsonl").resolve())  # ... provenance must too


# ---- pack ----------------------------------------------------------------------------------------

EOS = 0
HAND_DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # stream: 1 2 3 0 4 5 0 6 7 8 9 0


def packed(docs, ctx, max_seqs=100) -> list[tuple[list[int], int, int]]:
    out = []
    for seq in pack(docs, ctx, EOS, max_seqs):
        assert seq.ids.dtype == np.int32 and seq.ids.shape == (ctx,)
        out.append((seq.ids.tolist(), seq.doc, seq.offset))
    return out


@pytest.mark.parametrize("ctx, expected", [
    (4, [([1, 2, 3, 0], 0, 0), ([4, 5, 0, 6], 1, 0), ([7, 8, 9, 0], 2, 1)]),
    # the tail [9, 0] is shorter than ctx: dropped
    (5, [([1, 2, 3, 0, 4], 0, 0), ([5, 0, 6, 7, 8], 1, 1)]),
    # sequences may start on a document's EOS: its offset is then the document's length
    (3, [([1, 2, 3], 0, 0), ([0, 4, 5], 0, 3), ([0, 6, 7], 1, 2), ([8, 9, 0], 2, 2)]),
    (12, [([1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0], 0, 0)]),
    (13, []),
], ids=["ctx4", "ctx5-tail", "ctx3-eos-start", "exact", "too-short"])
def test_pack_hand_made(ctx, expected):
    assert packed(HAND_DOCS, ctx) == expected


def test_pack_cuts_a_long_document():
    docs = [[], list(range(1, 11)), [], [20]]  # stream: 0 | 1 … 10 0 | 0 | 20 0
    assert packed(docs, 4) == [([0, 1, 2, 3], 0, 0), ([4, 5, 6, 7], 1, 3), ([8, 9, 10, 0], 1, 7)]


def test_pack_empty_documents_count_as_their_eos():
    docs = [[], [7], [], [8, 9]]  # stream: 0 | 7 0 | 0 | 8 9 0
    assert packed(docs, 2) == [([0, 7], 0, 0), ([0, 0], 1, 1), ([8, 9], 3, 0)]


@pytest.mark.parametrize("max_seqs", [0, 1, 2])
def test_pack_stops_at_max_seqs(max_seqs):
    full = packed(HAND_DOCS, 4)
    assert packed(HAND_DOCS, 4, max_seqs=max_seqs) == full[:max_seqs]


def test_pack_reads_documents_lazily():
    def docs():
        yield from HAND_DOCS
        raise AssertionError("pack read past the documents it needed")

    first = next(pack(docs(), 4, EOS, max_seqs=10))
    assert first.ids.tolist() == [1, 2, 3, 0]


@settings(max_examples=300, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(1, 1000), max_size=40), max_size=30),
    ctx=st.integers(1, 24),
    max_seqs=st.integers(0, 40),
)
def test_pack_is_a_prefix_of_the_eos_joined_stream(docs, ctx, max_seqs):
    stream, starts = [], []  # starts[d]: position of document d's first token in the stream
    for doc in docs:
        starts.append(len(stream))
        stream += [*doc, EOS]
    seqs = list(pack(iter(docs), ctx, EOS, max_seqs))

    assert len(seqs) == min(max_seqs, len(stream) // ctx)
    joined = np.concatenate([s.ids for s in seqs]).tolist() if seqs else []
    assert joined == stream[:len(seqs) * ctx]
    for i, seq in enumerate(seqs):
        # (doc, offset) points at the sequence's first token; the EOS is the doc's last token
        assert 0 <= seq.offset <= len(docs[seq.doc])
        assert starts[seq.doc] + seq.offset == i * ctx


# ---- tokenize_documents ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "adds-bos"])
def tokenizer(tiny_model, request):
    """The tiny tokenizer as shipped, and one that adds BOS by default (as Llama's does)."""
    tok = AutoTokenizer.from_pretrained(tiny_model, add_bos_token=request.param)
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == request.param
    return tok


def test_tokenize_documents_equals_one_call_per_document(tokenizer, monkeypatch):
    paragraphs = [p for p in DEMO_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    long = paragraphs[0] * 8  # longer than the tokenizer's model_max_length: must not be cut
    assert len(tokenizer(long, add_special_tokens=False)["input_ids"]) > tokenizer.model_max_length
    documents = [*DOCS, "", " ", "\n", long, *paragraphs[:12]]
    monkeypatch.setattr(packing, "DOCS_PER_BATCH", 4)  # several full batches and a partial one
    got = list(tokenize_documents(tokenizer, iter(documents)))
    expected = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]
    assert got == expected
    assert all(tokenizer.bos_token_id not in ids for ids in got)  # no special tokens added
