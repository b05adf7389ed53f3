"""Training rows: the prepared attack corpus a run trains on (alone or mixed with other corpora
by data.mix, in a fixed plan), and the record of which rows and documents it trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from attack.checkpoints import ROWS_TRAINED, checkpoint_step
from attack.config import DataConfig
from attack.errors import UserError
from attack.files import save_array_atomic
from attack.packing import PackedCorpus, prepare_corpus


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
