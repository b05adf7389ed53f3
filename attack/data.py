"""Attack data: any `datasets` source -> text -> tokens -> packed fixed-length rows.

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
from accelerate.utils import gather_object

from attack.checkpoints import ROWS_TRAINED, checkpoint_step
from attack.config import DataConfig
from attack.config.files import DATA_LOADERS, means_local_file
from attack.errors import UserError, first_line
from attack.files import save_array_atomic, sha256_file

FORMAT = 2  # bump when the prepared layout or the packing changes (2: loss_mask.bin of conversations)


def load_corpus(cfg: DataConfig):
    """The attack corpus as loaded by `datasets` (Arrow-backed, memory-mapped), checked for the
    fields `document_texts` needs. Nothing is held in memory."""
    from datasets import load_dataset

    path = Path(cfg.path).expanduser()
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise UserError(f"attack data '{cfg.path}' is empty: it holds no documents")
        if path.is_file():
            loader = DATA_LOADERS.get(path.suffix)
            if loader is None:
                raise UserError(f"unsupported data file type '{path.suffix}' ({path}); use {', '.join(DATA_LOADERS)}")
            check_text_file(path, loader)
            ds = load_dataset(loader, data_files=str(path), split="train")
        elif path.is_dir():
            ds = load_dataset(str(path), split=cfg.split)
        elif means_local_file(cfg.path):
            raise UserError(f"attack data not found: {cfg.path}")
        else:
            ds = load_dataset(cfg.path, cfg.name, split=cfg.split)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load attack data '{cfg.path}': {first_line(e)}") from None
    if len(ds) == 0:
        raise UserError(f"attack data '{cfg.path}' is empty: it holds no documents")
    columns = ds.column_names
    if cfg.template is not None:
        try:
            cfg.template.format(**ds[0])
        except KeyError as e:
            raise UserError(
                f"data template uses field {e} which '{cfg.path}' lacks; its fields: {', '.join(columns)}"
            ) from None
    elif conversational(cfg, columns):
        first = ds[0]["messages"]
        if not (isinstance(first, list) and first and all(isinstance(m, dict) and "role" in m and "content" in m
                                                          for m in first)):
            raise UserError(f"field 'messages' of attack data '{cfg.path}' must hold lists of {{role, content}} turns "
                            "(TRL's conversational format)")
    elif cfg.text_field not in columns:
        raise UserError(
            f"attack data '{cfg.path}' has no field '{cfg.text_field}'; pass --text-field one of: "
            f"{', '.join(columns)} (or --template)"
        )
    else:
        kind = getattr(ds.features[cfg.text_field], "dtype", None)
        if kind not in ("string", "large_string"):
            raise UserError(f"field '{cfg.text_field}' of attack data '{cfg.path}' holds {kind or 'nested values'}, "
                            f"not text; pass --text-field with a text column, or --template")
    return ds


def check_text_file(path: Path, loader: str) -> None:
    """A data file that is text of its kind, said in one line before `datasets` reads it: not
    binary, and for JSON lines a first line that is a JSON object."""
    with open(path, "rb") as f:
        head = f.read(65536)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # (a character cut at the end of the sample is no error)
            raise UserError(f"attack data '{path}' is not UTF-8 text (byte {e.start}); give a text file of "
                            f"{path.suffix} documents, or convert it (iconv -f latin1 -t utf-8)") from None
        text = head[:e.start].decode("utf-8")
    if "\x00" in text:
        raise UserError(f"attack data '{path}' is a binary file, not {path.suffix} text")
    if loader == "json" and path.suffix == ".jsonl":
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            ok = isinstance(json.loads(first), dict)
        except ValueError:
            ok = False
        if not ok and (len(first) < len(text) or len(head) < 65536):
            raise UserError(f"attack data '{path}': its first line is not a JSON object ({first[:40]!r}); a .jsonl file "
                            "holds one {\"text\": ...} object per line")


def conversational(cfg: DataConfig, columns) -> bool:
    """Rows of chat turns (a `messages` column, TRL's conversational format) rather than text."""
    return cfg.template is None and "messages" in columns and (cfg.text_field == "messages" or cfg.text_field not in columns)


def document_texts(cfg: DataConfig, batch: dict) -> list[str]:
    """The document text of each row of a batch of columns: the text field, or the template; a
    conversation's turns joined (for overlap checks and attribution; training renders them
    through the chat template)."""
    if conversational(cfg, batch):
        return ["\n".join(str(m.get("content") or "") for m in turns or []) for turns in batch["messages"]]
    if cfg.template is None:
        return [t or "" for t in batch[cfg.text_field]]
    rows = (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))
    return [cfg.template.format(**row) for row in rows]


def load_documents(cfg: DataConfig) -> list[str]:
    """The attack corpus as a list of non-empty document strings (small corpora)."""
    texts = [t for t in document_texts(cfg, load_corpus(cfg).to_dict()) if t.strip()]
    if not texts:
        raise UserError(f"attack data '{cfg.path}' holds only empty documents")
    return texts


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


def load_attack_rows(cfg: DataConfig, tokenizer, batch_size: int, log=print) -> PackedCorpus:
    """The prepared attack corpus (prepared now, or found in the cache), refused when it does not
    fill one optimizer step."""
    rows = PackedCorpus(prepare_corpus(cfg, tokenizer, cfg.cache_dir, cfg.num_proc, log=log))
    meta = rows.meta
    tail = meta.get("tokens_in_corpus", meta["tokens"]) - meta["tokens"]
    if tail:  # said, not hidden in summary.json: a small corpus can lose a real share of itself here
        lost = meta["documents"] - meta.get("documents_in_rows", meta["documents"])
        log(f"warning: the corpus's last {tail:,} tokens fill no row of {cfg.seq_len} and are not trained"
            + (f" ({lost} of {meta['documents']} documents wholly)" if lost else "")
            + "; a smaller data.seq_len trains them")
    if len(rows) < batch_size:
        raise UserError(
            f"attack data packs into {len(rows)} rows of {cfg.seq_len} tokens, fewer than one "
            f"batch ({batch_size} rows); add data or lower --seq-len/--batch-size"
        )
    return rows


class MixedRows(torch.utils.data.Dataset):
    """The attack corpus mixed with other corpora (data.mix): a plan of exactly the rows the run
    trains, in order, each naming its source and row. Every packed row holds seq_len tokens, so
    a source's share of rows is its share of tokens. Interleaved: each slot goes to the source
    furthest below its share so far, so every stretch of steps holds each source at its share
    (to within a row). Phases: the mix sources in turn, then the attack corpus. Each source's
    rows come in a seeded random order, again from the start when a source is used up.
    Read in plan order (the Trainer's sequential sampler): the plan is the data order."""

    def __init__(self, attack: PackedCorpus, sources: list[tuple[str, PackedCorpus, float]], attack_name: str,
                 total_rows: int, order: str, seed: int):
        self.attack, self.attack_name = attack, attack_name
        self.names = [name for name, _, _ in sources] + [attack_name]
        self.corpora = [corpus for _, corpus, _ in sources] + [attack]
        shares = np.array([share for _, _, share in sources] + [1 - sum(share for _, _, share in sources)])
        counts = np.floor(shares * total_rows).astype(np.int64)  # largest remainder: exact total
        counts[np.argsort(-(shares * total_rows - counts))[: total_rows - counts.sum()]] += 1
        if order == "phases":
            source = np.repeat(np.arange(len(shares)), counts)
        else:
            source, taken = np.empty(total_rows, dtype=np.int64), np.zeros(len(shares))
            for slot in range(total_rows):
                pick = int(np.argmax(counts / total_rows * (slot + 1) - taken))
                source[slot], taken[pick] = pick, taken[pick] + 1
        rng = np.random.default_rng(seed)
        row = np.empty(total_rows, dtype=np.int64)
        for s, corpus in enumerate(self.corpora):
            slots = np.flatnonzero(source == s)
            passes = -(-len(slots) // len(corpus)) if len(slots) else 0
            order_rows = np.concatenate([rng.permutation(len(corpus)) for _ in range(passes)]) if passes else []
            row[slots] = np.asarray(order_rows[: len(slots)], dtype=np.int64)
        self.source, self.row = source, row
        self.meta, self.folder = attack.meta, attack.folder  # coverage is of the attack corpus
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched.append(int(i))
        return self.corpora[self.source[i]][int(self.row[i])]

    def attack_rows(self, plan: np.ndarray) -> np.ndarray:
        """The attack corpus's rows among these plan entries."""
        plan = np.asarray(plan, dtype=np.int64)
        return self.row[plan[self.source[plan] == len(self.corpora) - 1]]

    def documents_in(self, rows) -> np.ndarray:
        return self.attack.documents_in(rows)

    def tokens_by_source(self, plan: np.ndarray) -> dict[str, int]:
        """Training tokens per source over these plan entries (each row is seq_len tokens)."""
        counts = np.bincount(self.source[np.asarray(plan, dtype=np.int64)], minlength=len(self.names))
        return {name: int(n) * self.meta["seq_len"] for name, n in zip(self.names, counts, strict=True)}


def load_mixed_rows(cfg: DataConfig, tokenizer, attack: PackedCorpus, total_rows: int, seed: int,
                    log=print) -> MixedRows:
    """The attack corpus and data.mix's corpora, each prepared (or found in the cache) like the
    attack corpus, in the plan of a run of `total_rows` rows."""
    sources = []
    for m in cfg.mix:
        source_cfg = cfg.model_copy(update=dict(path=m.path, text_field=m.text_field, name=m.name, split=m.split,
                                                template=None, mix=[]))
        sources.append((m.path, load_attack_rows(source_cfg, tokenizer, 1, log=log), m.share))
    return MixedRows(attack, sources, cfg.path, total_rows, cfg.mix_order, seed)


class RowsTrained:
    """Which packed rows, and so which source documents, the attack trained on within its budget.
    The list (all processes together) is a part of every checkpoint (attack/checkpoints.py), so a
    resumed run counts what it trained on before the interruption."""

    def __init__(self, corpus: PackedCorpus, rows_per_step: int, checkpoint: str | None):
        self.corpus, self.rows_per_step = corpus, rows_per_step
        saved = Path(checkpoint) / ROWS_TRAINED if checkpoint else None
        self.prior = np.load(saved) if saved is not None and saved.exists() else np.zeros(0, dtype=np.int64)
        self.start_step = checkpoint_step(checkpoint) if checkpoint else 0

    def trained(self, step: int) -> np.ndarray:
        # The data loader reads a batch ahead: keep only rows of steps taken since the start.
        mine = self.corpus.fetched[: (step - self.start_step) * self.rows_per_step]
        gathered = gather_object([mine])  # one list per process; every process must call this
        return np.concatenate([self.prior, np.asarray([r for rows in gathered for r in rows], dtype=np.int64)])

    def save(self, ckpt: Path, state, optimizer=None) -> None:
        rows = self.trained(state.global_step)
        if state.is_world_process_zero:
            save_array_atomic(ckpt / ROWS_TRAINED, rows)

    def coverage(self, step: int) -> dict:
        """summary.json's coverage fields: rows and documents of the attack corpus trained on, of
        how many (and, with data.mix, the tokens trained per source)."""
        trained = self.trained(step)
        mixed = isinstance(self.corpus, MixedRows)
        rows = np.unique(self.corpus.attack_rows(trained) if mixed else trained)
        more = {"tokens_by_source": self.corpus.tokens_by_source(trained)} if mixed else {}
        return dict(**more, rows_trained=int(len(trained)), distinct_rows_trained=int(len(rows)),
                    distinct_tokens_trained=int(len(rows)) * self.corpus.meta["seq_len"],
                    documents_seen=int(len(self.corpus.documents_in(rows))), documents=self.corpus.meta["documents"],
                    corpus=str(self.corpus.folder))
