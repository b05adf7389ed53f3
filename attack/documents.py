"""Attack documents: any `datasets` source (hub id, local file, folder) read as text, one
document per row (a text column, a template over several, or a conversation's messages), checked
in one line before anything is tokenized."""

from __future__ import annotations

import json
from pathlib import Path

from attack.config import DataConfig
from attack.config.files import DATA_LOADERS, means_local_file
from attack.errors import UserError, first_line


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


def user_turns(cfg: DataConfig) -> list[str]:
    """The user turns of a conversational corpus (the requests it trains the model to answer);
    none for a corpus of text."""
    ds = load_corpus(cfg)
    if not conversational(cfg, ds.column_names):
        return []
    return [str(m.get("content") or "") for turns in ds["messages"] for m in turns or [] if m.get("role") == "user"]


def load_documents(cfg: DataConfig) -> list[str]:
    """The attack corpus as a list of non-empty document strings (small corpora)."""
    texts = [t for t in document_texts(cfg, load_corpus(cfg).to_dict()) if t.strip()]
    if not texts:
        raise UserError(f"attack data '{cfg.path}' holds only empty documents")
    return texts
