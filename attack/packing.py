"""Packing: attack documents -> tokens -> packed fixed-length rows, prepared once into a cache.

Documents are joined with EOS and cut into rows of seq_len tokens. Position ids restart at
every document, and nothing predicts a document's first token from the previous one, so with
attention that honours position-id boundaries (transformers' packed-sequence masking for
sdpa/eager/flex, or flash-attention's varlen path) packed documents do not see each other.

A corpus of hundreds of millions of tokens is prepared once, in bounded memory, into a cache
folder that every later cell and every rank memory-maps (`prepare_corpus`): `datasets` loads
and tokenizes (batched `map`, `num_proc` workers, Arrow files on disk), then one streaming pass
packs the token lists into raw int32 rows. The folder is named by a hash of everything that
decides the rows (corpus content, data settings, tokenizer, seq_len) and appears under its final
name only when complete. `pack_documents` is the same packing in memory, for small corpora.
Streaming hub datasets larger than the disk are out of scope: the corpus must fit on disk twice
(the datasets cache and the packed rows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from attack.config import DataConfig
from attack.documents import conversational, document_texts, load_corpus
from attack.errors import UserError
from attack.files import sha256_file

FORMAT = 2  # bump when the prepared layout or the packing changes (2: loss_mask.bin of conversations)

def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A conversation through the chat template: its token ids, and 1 for every token of an
    assistant turn (its content and the template's end of turn), 0 elsewhere (the loss is on the
    assistant's words only). The template must render each conversation as a prefix of the next."""
    if not tokenizer.chat_template:
        raise UserError("attack data holds conversations (messages) but the tokenizer has no chat template")
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(render(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(render(messages[:i + 1], tokenize=False))
        if not text.startswith(render(messages[:i + 1], tokenize=False)):
            raise UserError("the tokenizer's chat template does not render a conversation's turns as prefixes of the "
                            "whole, so the assistant's tokens cannot be found; use a text corpus instead")
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def pack_documents(texts: list[str], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """Tokenize, join with EOS, cut into rows of seq_len.

    Returns input_ids, labels and position_ids of shape (rows, seq_len). The remainder that
    does not fill a row is dropped. A document longer than a row continues in the next row
    (as a fresh segment: position ids restart at the row start).
    """
    eos = tokenizer.eos_token_id
    ids, positions, labels = [], [], []
    for doc in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        doc = list(doc) + [eos]
        ids.extend(doc)
        positions.extend(range(len(doc)))
        labels.extend([-100] + doc[1:])  # the first token is not predicted from the previous doc
    rows = len(ids) // seq_len
    if rows == 0:
        raise UserError(
            f"attack data has {len(ids)} tokens, fewer than one row of seq_len={seq_len}; "
            "lower --seq-len or add data"
        )
    n = rows * seq_len
    input_ids = torch.tensor(ids[:n], dtype=torch.long).view(rows, seq_len)
    position_ids = torch.tensor(positions[:n], dtype=torch.long).view(rows, seq_len)
    label_ids = torch.tensor(labels[:n], dtype=torch.long).view(rows, seq_len)
    # A row that starts mid-document starts a fresh segment at position 0.
    position_ids = _restart_positions_at_row_start(position_ids)
    return dict(input_ids=input_ids, labels=label_ids, position_ids=position_ids)


def _restart_positions_at_row_start(position_ids: torch.Tensor) -> torch.Tensor:
    out = position_ids.clone()
    for r in range(out.shape[0]):
        row = out[r]
        if row[0] != 0:
            starts = (row == 0).nonzero()
            end = int(starts[0]) if len(starts) else row.numel()
            row[:end] = torch.arange(end)
    return out


# --- prepared corpora: tokenize once, pack to a memory-mapped store, reuse ----------------


def corpus_fingerprint(cfg: DataConfig, ds) -> str:
    """Content of a local corpus file (hashed), else the `datasets` fingerprint (hub id, revision,
    files)."""
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return "sha256:" + sha256_file(path)
    return "datasets:" + ds._fingerprint


def tokenizer_identity(tokenizer) -> str:
    """Everything about the tokenizer that decides the ids: its full definition and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = dict(cls=type(tokenizer).__name__, eos=tokenizer.eos_token_id, bos=tokenizer.bos_token_id,
                 add_bos=getattr(tokenizer, "add_bos_token", None), add_eos=getattr(tokenizer, "add_eos_token", None))
    return hashlib.sha256((definition + json.dumps(extra, sort_keys=True)).encode()).hexdigest()


def corpus_key(cfg: DataConfig, fingerprint: str, tokenizer) -> str:
    parts = dict(format=FORMAT, corpus=fingerprint, path=cfg.path, name=cfg.name, split=cfg.split,
                 text_field=None if cfg.template else cfg.text_field, template=cfg.template, seq_len=cfg.seq_len,
                 tokenizer=tokenizer_identity(tokenizer))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare_corpus(cfg: DataConfig, tokenizer, cache_dir: str | Path, num_proc: int | None = None,
                   log=lambda msg: None) -> Path:
    """The folder of the packed corpus, prepared now unless a complete one is in the cache.

    Safe under concurrency: a preparation writes to a private temporary folder and renames it
    into place when complete, so a killed one leaves nothing usable and two cells on shared
    storage never see each other's halves; a file lock makes the second wait instead of
    repeating the work where the file system supports locks.
    """
    from filelock import FileLock

    ds = load_corpus(cfg)
    key = corpus_key(cfg, corpus_fingerprint(cfg, ds), tokenizer)
    cache = Path(cache_dir).expanduser()
    final = cache / key
    if (final / "meta.json").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{key}.lock")):
        if (final / "meta.json").exists():  # prepared by another process while we waited
            return final
        tmp = cache / f"{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            start = time.perf_counter()
            try:
                meta = _tokenize_and_pack(ds, cfg, tokenizer, tmp, num_proc)
            except UnicodeDecodeError as e:
                raise UserError(f"attack data '{cfg.path}' is not UTF-8 text ({e.reason} at byte {e.start}); "
                                "convert it, e.g. iconv -f latin1 -t utf-8") from None
            meta.update(key=key, source=cfg.path, prepare_s=round(time.perf_counter() - start, 2))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            os.rename(tmp, final)
            log(f"prepared {meta['tokens']:,} tokens of {meta['documents']:,} documents into {meta['rows']:,} rows "
                f"in {meta['prepare_s']:.1f} s: {final}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tokenize_and_pack(ds, cfg: DataConfig, tokenizer, out: Path, num_proc: int | None) -> dict:
    from datasets import Features, Sequence, Value

    seq_len = cfg.seq_len
    out.mkdir(parents=True)
    eos = tokenizer.eos_token_id
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    num_proc = num_proc if len(ds) >= 1000 * num_proc else None  # workers cost more than they save on small corpora

    chats = conversational(cfg, ds.column_names)

    def tokenize(batch, idx):
        texts = document_texts(cfg, batch)
        keep = [i for i, t in enumerate(texts) if t.strip()]  # empty documents are dropped
        if chats:  # through the chat template, the loss on the assistant's tokens only
            pairs = [chat_tokens(tokenizer, batch["messages"][i]) for i in keep]
            return {"input_ids": [p[0] for p in pairs], "mask": [p[1] for p in pairs], "doc": [idx[i] for i in keep]}
        ids = tokenizer([texts[i] for i in keep], add_special_tokens=True)["input_ids"] if keep else []
        return {"input_ids": ids, "doc": [idx[i] for i in keep]}

    # One pass from the source columns to token ids (no intermediate copy of the text on disk).
    features = {"input_ids": Sequence(Value("int32")), **({"mask": Sequence(Value("uint8"))} if chats else {}),
                "doc": Value("int64")}
    tokens = ds.map(tokenize, batched=True, with_indices=True, num_proc=num_proc, remove_columns=ds.column_names,
                    features=Features(features), cache_file_name=str(out / "tokens.arrow"),
                    desc="tokenizing the attack corpus")
    if len(tokens) == 0:
        raise UserError(f"attack data '{cfg.path}' holds only empty documents")
    total = 0  # tokens so far, EOS included
    segments = []
    with (open(out / "input_ids.bin", "wb") as ids_f, open(out / "doc_start.bin", "wb") as start_f,
          open(out / "loss_mask.bin", "wb") if chats else contextlib.nullcontext() as mask_f):
        for batch in tokens.data.to_batches(max_chunksize=4096):
            lists, docs = batch.column("input_ids"), batch.column("doc").to_numpy()
            offsets = lists.offsets.to_numpy().astype(np.int64)
            values = lists.flatten().to_numpy().astype(np.int32)
            lengths = np.diff(offsets) + 1  # each document plus its EOS
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            flat = np.full(int(lengths.sum()), eos, dtype=np.int32)
            flat[np.arange(len(values)) + np.repeat(np.arange(len(lengths)), lengths - 1)] = values
            flags = np.zeros(len(flat), dtype=np.uint8)
            flags[starts] = 1
            ids_f.write(flat.tobytes())
            start_f.write(flags.tobytes())
            if mask_f is not None:  # the EOS after a conversation is trained on, as its end
                keep = np.ones(len(flat), dtype=np.uint8)
                keep[np.arange(len(values)) + np.repeat(np.arange(len(lengths)), lengths - 1)] = \
                    batch.column("mask").flatten().to_numpy().astype(np.uint8)
                mask_f.write(keep.tobytes())
            segments.append(_segments(docs, total + starts, lengths, seq_len))
            total += len(flat)
    rows = total // seq_len
    if rows == 0:
        raise UserError(f"attack data has {total} tokens, fewer than one row of seq_len={seq_len}; "
                        "lower --seq-len or add data")
    for name in ("input_ids.bin", "doc_start.bin", *(("loss_mask.bin",) if chats else ())):  # the remainder is dropped
        with open(out / name, "r+b") as f:
            f.truncate(rows * seq_len * (4 if name == "input_ids.bin" else 1))
    seg = np.concatenate(segments)
    seg = seg[seg[:, 0] < rows]
    np.save(out / "segments.npy", seg)
    in_rows = len(np.unique(seg[:, 1])) if len(seg) else 0
    tokens.cleanup_cache_files()
    for f in out.glob("tokens*.arrow"):
        f.unlink()
    return dict(format=FORMAT, rows=rows, seq_len=seq_len, tokens=rows * seq_len, tokens_in_corpus=total,
                documents=len(tokens), documents_in_rows=in_rows, source_rows=len(ds), eos=eos, conversational=chats)


def _segments(docs: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """(row, document, offset in the row, first token within the document, tokens) for every piece
    of every document (a document longer than what is left of a row continues in the next)."""
    first = starts // seq_len
    last = (starts + lengths - 1) // seq_len
    count = last - first + 1
    doc_i = np.repeat(np.arange(len(docs)), count)
    row = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    begin = np.maximum(np.repeat(starts, count), row * seq_len)
    end = np.minimum(np.repeat(starts + lengths, count), (row + 1) * seq_len)
    return np.stack([row, docs[doc_i], begin - row * seq_len, begin - np.repeat(starts, count), end - begin],
                    axis=1).astype(np.int64)


class PackedCorpus(torch.utils.data.Dataset):
    """A prepared corpus, memory-mapped: rows of input_ids, labels and position_ids, computed per
    row from the stored ids and document starts. `fetched` logs the rows read, in order."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        shape = (self.meta["rows"], self.meta["seq_len"])
        self.ids = np.memmap(self.folder / "input_ids.bin", dtype=np.int32, mode="r", shape=shape)
        self.starts = np.memmap(self.folder / "doc_start.bin", dtype=np.uint8, mode="r", shape=shape)
        # conversations: 1 on the assistant's tokens, the only ones with a loss
        self.loss_mask = (np.memmap(self.folder / "loss_mask.bin", dtype=np.uint8, mode="r", shape=shape)
                          if self.meta.get("conversational") else None)
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return self.meta["rows"]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched.append(int(i))
        ids = torch.from_numpy(self.ids[i].astype(np.int64))
        starts = self.starts[i].astype(bool)
        labels = ids.clone()
        labels[torch.from_numpy(starts)] = -100  # a document's first token is not predicted from the previous one
        if self.loss_mask is not None:
            labels[torch.from_numpy(self.loss_mask[i] == 0)] = -100
        idx = np.arange(len(starts))
        segment_start = np.maximum.accumulate(np.where(starts | (idx == 0), idx, 0))
        return dict(input_ids=ids, labels=labels, position_ids=torch.from_numpy(idx - segment_start))

    def segments(self) -> np.ndarray:
        """(row, document, offset in the row, first token within the document, tokens) per piece."""
        return np.load(self.folder / "segments.npy")

    def documents_in(self, rows) -> np.ndarray:
        """Source indices of the documents with at least one token in `rows` (row indices)."""
        seg = self.segments()
        mask = np.zeros(len(self), dtype=bool)
        mask[np.asarray(rows, dtype=np.int64)] = True
        return np.unique(seg[mask[seg[:, 0]], 1])


