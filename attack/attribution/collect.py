"""Attribution, collected while the attack runs (opt-in: --attribution).

Two streams go to <run>/attribution/:

    train/epoch_E/   Bergson's gradients of each epoch, one per document piece of the packed rows:
                     the update the optimizer applied for that piece (LoRA gradient, random
                     projection, divided by Adam's second moment, times the learning rate)
    pieces.npy       the pieces: (row, document, offset in row, first token, tokens); a
                     document's index is its row in the attack corpus
    order.hf         which piece trained at which step (Bergson)
    step_epochs.json the epoch folder of each step's rows
    queries/step-N.npy  at each evaluation point N > 0: the gradient of every evaluated question's
                     loss on its correct answer, through the same projection and Adam correction
    questions.json   the questions in the order of those rows: task, index, context, answer

`python -m attack attribute RUN_DIR` (attack/attribution/attribute.py) scores them: a question's gradient at
point N against the update of each document piece trained since the previous point (TracIn).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch
from transformers import TrainerCallback

from attack.errors import UserError
from attack.files import save_array_atomic, write_atomic
from attack.model import continuation_logprobs
from attack.rundir import AttributionFiles
from eval_callbacks.runner import preserved_training_state


class IndexedRows(torch.utils.data.Dataset):
    """The packed attack rows, each with its index (`_idx`), which the collector's forward hook
    reads and removes before the model sees the batch."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "_idx": i}


def require_bergson() -> None:
    try:
        import bergson  # noqa: F401
    except ImportError:
        raise UserError("--attribution needs bergson: pip install --no-deps bergson==2.5.1 (make does)") from None


def collection_callbacks(trainer, files: AttributionFiles, pieces: np.ndarray, evaluator, schedule: list[int],
                         projection_dim: int) -> list:
    """Bergson's gradient collection on `trainer`, one gradient per document piece of each packed
    row, and the query gradients at every scheduled step, into the run's attribution/ folder."""
    trainer.args.__gradient_collection_enabled__ = True  # what bergson's prepare step marks
    collector = DocumentGradients(files, pieces, projection_dim)
    return [collector, QueryGradients(collector, evaluator, files, schedule)]


def _piece_collector(base):
    """Bergson's streaming collector, taking one gradient per document piece instead of per row.

    A packed row holds pieces of several documents; its gradient is their sum, so ranking rows
    would credit every document in a row alike. A piece's gradient is the sum over its positions
    of the per-position outer products (position ids restart per document, so attention and the
    loss stay inside it). Regrouping the positions of the batch piece by piece into a zero-padded
    [pieces, longest, features] batch makes Bergson's per-example gradient (its optimizer-state
    normalisation and projection, unchanged) the per-piece gradient."""

    class PieceGradientCollector(base):
        regroup = None  # set for every batch: (piece, position in piece, flat source position)

        def backward_hook(self, module, g):
            module._inputs = self._by_piece(module._inputs)
            super().backward_hook(module, self._by_piece(g))

        def _by_piece(self, x: torch.Tensor) -> torch.Tensor:
            piece, position, source, shape = self.regroup
            out = x.new_zeros(*shape, x.shape[-1])
            out[piece, position] = x.reshape(-1, x.shape[-1])[source]
            return out

    return PieceGradientCollector


def _document_gradients_class():
    from bergson.collector.gradient_collectors import StreamingGradientCollector
    from bergson.data import create_index
    from bergson.huggingface import GradientCollectorCallback

    piece_collector = _piece_collector(StreamingGradientCollector)

    class DocumentGradients(GradientCollectorCallback):
        """Bergson's Trainer callback (the update each example applied: LoRA gradient, random
        projection, divided by Adam's second moment, times the learning rate), with the examples
        being the document pieces of the packed rows rather than the rows. Gradients of epoch E go
        to train/epoch_E/, row i of which is piece i of the corpus's segment table; order.hf
        records which piece trained at which step."""

        def __init__(self, files: AttributionFiles, pieces: np.ndarray, projection_dim: int):
            # float32 on disk: Adam's normaliser is tiny in the first steps, and fp16 (Bergson's
            # default) overflows to inf there
            super().__init__(files.path, projection_dim=projection_dim, dtype=np.dtype(np.float32), track_order=True)
            self.files = files
            self.pieces = pieces  # (row, document, offset in row, first token, tokens), sorted by row
            self.first_piece = np.searchsorted(pieces[:, 0], np.arange(pieces[:, 0].max() + 2))

        def on_train_begin(self, args, state, control, *, model, **kwargs):
            super().on_train_begin(args, state, control, model=model, **kwargs)
            if state.is_world_process_zero:
                self.path.mkdir(parents=True, exist_ok=True)
                save_array_atomic(self.files.pieces, self.pieces)  # the row-to-document map, kept with the run
            rows = self.collector
            rows.__exit__(None, None, None)
            self.collector = piece_collector(model=rows.model, processor=rows.processor,
                                             target_modules=set(rows.target_info), dtype=rows.dtype)
            self.collector.__enter__()

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.train_grad_buffer = create_index(self.files.train / f"epoch_{int(state.epoch or 0)}",
                                                  num_grads=len(self.pieces), grad_sizes=self.grad_sizes,
                                                  dtype=self.dtype)

        def on_forward_begin(self, module, args, kwargs: dict):
            rows = kwargs.pop("_idx", None)
            if module.training and rows is not None:
                ids, self.collector.regroup = self._regroup(rows.tolist(), kwargs["input_ids"].shape[1])
                self.batch_indices = torch.as_tensor(ids)
            return args, kwargs

        def _regroup(self, rows: list[int], width: int):
            ids, piece, position, source = [], [], [], []
            longest = 1
            for i, row in enumerate(rows):
                for p in range(self.first_piece[row], self.first_piece[row + 1]):
                    offset, tokens = int(self.pieces[p, 2]), int(self.pieces[p, 4])
                    piece += [len(ids)] * tokens
                    position += range(tokens)
                    source += range(i * width + offset, i * width + offset + tokens)
                    ids.append(p)
                    longest = max(longest, tokens)
            regroup = (torch.tensor(piece), torch.tensor(position), torch.tensor(source), (len(ids), longest))
            return ids, regroup

    return DocumentGradients


def DocumentGradients(files: AttributionFiles, pieces: np.ndarray, projection_dim: int):
    """See `_document_gradients_class` (bergson is imported only when attribution is on)."""
    return _document_gradients_class()(files, pieces, projection_dim)


def question_examples(tasks: dict) -> list[dict]:
    """Every question of the multiple-choice tasks among `tasks` (lm-eval's leaf tasks, by name):
    leaf task, index in its evaluation documents, the context the model reads and the correct
    continuation (lm-eval's own)."""
    out = []
    for name, task in tasks.items():
        if task.OUTPUT_TYPE != "multiple_choice":
            continue  # generation tasks have no single correct continuation to differentiate
        delimiter = task.config.target_delimiter
        for i, doc in enumerate(task.eval_docs):
            context = task.fewshot_context(doc, num_fewshot=0)
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_target(doc)
            gold = gold if isinstance(gold, int) else choices.index(gold)
            out.append(dict(task=name, question=i, context=context, answer=delimiter + str(choices[gold])))
    return out


class QueryGradients(TrainerCallback):
    """At each scheduled step after 0: every question's projected gradient of -log p(correct
    answer) at the current weights, through Bergson's projection of the training rows. Runs in
    eval mode (no dropout, so no random numbers drawn) and clears what it accumulates, so the
    attack trains exactly as without it."""

    def __init__(self, collector, evaluator, files: AttributionFiles, schedule: list[int], batch_size: int = 8):
        self.collector, self.evaluator, self.files = collector, evaluator, files
        self.schedule, self.batch_size = set(schedule), batch_size
        self.examples = question_examples(evaluator.tasks)

    def on_train_begin(self, args, state, control, **kwargs):
        self.epochs: dict[int, int] = {}
        if state.is_world_process_zero:
            self.files.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.files.questions, json.dumps(self.examples))

    def on_step_begin(self, args, state, control, **kwargs):
        # The epoch folder this step's rows go to. Bergson's order.hf reads the epoch after the
        # step, which at an epoch's last step is already the next one.
        self.epochs[state.global_step + 1] = int(state.epoch or 0)

    def on_train_end(self, args, state, control, **kwargs):
        self.collector.train_grad_buffer.flush()  # Bergson flushes at epoch ends; the last one may be cut short
        if state.is_world_process_zero:
            write_atomic(self.files.step_epochs, json.dumps(self.epochs))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.schedule and state.is_world_process_zero:
            self.files.queries.mkdir(parents=True, exist_ok=True)
            save_array_atomic(self.files.query(state.global_step), self.gradients(model))

    def gradients(self, model) -> np.ndarray:
        from bergson.collector.gradient_collectors import TraceCollector

        tok = self.evaluator.tokenizer
        base = getattr(model, "base_model", model)
        training = self.collector.collector  # the live StreamingGradientCollector: its modules and projection
        order = list(self.collector.grad_sizes)
        rows = []
        self.collector.collector.__exit__(None, None, None)  # training hooks off while questions run
        try:
            # eval mode, RNG kept; the questions' inputs need no gradient, which torch warns about
            with preserved_training_state(model), torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for start in range(0, len(self.examples), self.batch_size):
                    batch = self.examples[start:start + self.batch_size]
                    tracer = TraceCollector(model=base, processor=training.processor, target_modules=set(order),
                                            device="cpu", dtype=torch.float32)
                    with tracer:
                        _answer_loss(model, tok, batch).backward()
                    model.zero_grad(set_to_none=True)
                    rows.append(torch.cat([torch.cat(tracer.mod_grads[name], dim=1) for name in order], dim=1))
        finally:
            self.collector.collector.__enter__()
        return torch.cat(rows).numpy()


def _answer_loss(model, tokenizer, batch: list[dict]) -> torch.Tensor:
    """Sum over the batch of each question's -log p(answer | context); one example per row, so
    the per-example gradients Bergson's hooks take are each question's own."""
    return -continuation_logprobs(model, tokenizer, [ex["context"] for ex in batch], [ex["answer"] for ex in batch]).sum()
