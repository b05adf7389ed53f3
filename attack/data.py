"""Attack data: any `datasets` source -> text -> tokens -> packed fixed-length rows.

Documents are joined with EOS and cut into rows of seq_len tokens. Position ids restart at
every document, and nothing predicts a document's first token from the previous one, so with
attention that honours position-id boundaries (transformers' packed-sequence masking for
sdpa/eager/flex, or flash-attention's varlen path) packed documents do not see each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attack.config import DataConfig
from attack.errors import UserError, first_line

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_documents(cfg: DataConfig) -> list[str]:
    """The attack corpus as a list of document strings."""
    from datasets import load_dataset

    path = Path(cfg.path).expanduser()
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise UserError(f"attack data '{cfg.path}' is empty: it holds no documents")
        if path.is_file():
            loader = _LOADERS.get(path.suffix)
            if loader is None:
                raise UserError(f"unsupported data file type '{path.suffix}' ({path}); use {', '.join(_LOADERS)}")
            ds = load_dataset(loader, data_files=str(path), split="train")
        elif path.is_dir():
            ds = load_dataset(str(path), split=cfg.split)
        elif cfg.path.startswith((".", "/", "~")):
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
            texts = [cfg.template.format(**row) for row in ds]
        except KeyError as e:
            raise UserError(
                f"data template uses field {e} which '{cfg.path}' lacks; its fields: {', '.join(columns)}"
            ) from None
    else:
        if cfg.text_field not in columns:
            raise UserError(
                f"attack data '{cfg.path}' has no field '{cfg.text_field}'; pass --text-field one of: "
                f"{', '.join(columns)} (or --template)"
            )
        texts = [t for t in ds[cfg.text_field] if t]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError(f"attack data '{cfg.path}' holds only empty documents")
    return texts


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


class PackedRows(torch.utils.data.Dataset):
    """Packed rows as a map-style dataset for the Trainer (one dict of tensors per row)."""

    def __init__(self, packed: dict[str, torch.Tensor]):
        self.packed = packed

    def __len__(self) -> int:
        return self.packed["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.packed.items()}
