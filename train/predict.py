"""`berttrain predict`: what a trained model puts in place of [MASK], for typed text and for shard rows (an HTML
page that colours each masked token by whether the model got it right)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from prep.errors import BertError
from prep.outputs import write_atomic
from prep.shards import Split
from train.pretrained import Pretrained

PREDICT_BATCH_ROWS = 32


@dataclass
class Predictor:
    """A trained model in eval mode with its tokenizer."""

    pretrained: Pretrained
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @classmethod
    def load(cls, pretrained: Pretrained, device: torch.device | str = "cpu") -> Predictor:
        device = torch.device(device)
        return cls(pretrained, pretrained.model(device), pretrained.tokenizer(), device)

    @property
    def vocab(self):
        return self.tokenizer.vocab

    def encode(self, text: str) -> list[int]:
        """[CLS] text [SEP] as ids; BertError when longer than the model's position table."""
        special = self.vocab.special
        ids = [special.cls, *self.tokenizer.encode(text), special.sep]
        limit = self.pretrained.config.max_positions
        if len(ids) > limit:
            raise BertError(f"the text {_short(text)!r} is {len(ids)} tokens long with [CLS] and [SEP], more than the "
                            f"model's {limit} positions: shorten it")
        return ids

    @torch.no_grad()
    def fill_masks(self, texts: Sequence[str], top_k: int = 5) -> list[dict]:
        """For every text, the top-k tokens at each of its [MASK]s with probabilities from the full softmax.

        Returns per text {"text", "masks": [[{"token", "id", "prob"}, ...] per [MASK]], "filled"}: `filled` is the
        text with every [MASK] replaced by its most likely token, word pieces joined.
        """
        if top_k < 1:
            raise BertError(f"-k must be at least 1, got {top_k}")
        mask_id, pad_id = self.vocab.special.mask, self.pretrained.config.pad_id
        encoded = [self.encode(text) for text in texts]
        for text, ids in zip(texts, encoded):
            if mask_id not in ids:
                raise BertError(f"no [MASK] in {_short(text)!r}: write [MASK] (in capitals) where the model should "
                                f"fill in a token")
        tokens = self.vocab.tokens
        top_k = min(top_k, self.pretrained.config.vocab_size)
        results = []
        for start in range(0, len(encoded), PREDICT_BATCH_ROWS):
            chunk = encoded[start : start + PREDICT_BATCH_ROWS]
            input_ids = _pad([torch.tensor(ids) for ids in chunk], pad_id)
            attention_mask = _pad([torch.ones(len(ids), dtype=torch.bool) for ids in chunk], False)
            positions = _pad([torch.tensor([i for i, t in enumerate(ids) if t == mask_id]) for ids in chunk], 0)
            logits = self.model.logits(input_ids.to(self.device), positions.to(self.device),
                                       attention_mask=attention_mask.to(self.device))
            top_p, top_i = logits.float().softmax(-1).topk(top_k, dim=-1)
            for row, ids in enumerate(chunk):
                count = ids.count(mask_id)
                masks = [[{"token": tokens[i], "id": i, "prob": p} for p, i in zip(ps, is_)]
                         for ps, is_ in zip(top_p[row, :count].tolist(), top_i[row, :count].tolist())]
                best = iter(top_i[row, :count, 0].tolist())
                filled = [next(best) if t == mask_id else t for t in ids[1:-1]]
                results.append({"text": texts[start + row], "masks": masks, "filled": self.tokenizer.decode(filled)})
        return results

    @torch.no_grad()
    def score_rows(self, split: Split, start: int, stop: int) -> list[dict]:
        """Shard rows start..stop with the model's guess at every masked slot.

        Per row: "tokens", the unmasked row's vocabulary strings (padding cut), and "slots", one per masked position
        in order: {"position", "truth", "prediction", "prob" (of the prediction), "truth_prob", "input" (what the row
        held there: [MASK], a random token, or the truth kept), "correct"}.
        """
        tokens, pad_id = self.vocab.tokens, self.pretrained.config.pad_id
        rows = []
        for begin in range(start, stop, PREDICT_BATCH_ROWS):
            arrays = split.slice(begin, min(stop, begin + PREDICT_BATCH_ROWS))
            input_ids = torch.from_numpy(np.asarray(arrays["input_ids"], dtype=np.int64))
            positions = torch.from_numpy(np.asarray(arrays["mlm_positions"], dtype=np.int64))
            labels = torch.from_numpy(np.asarray(arrays["mlm_labels"], dtype=np.int64))
            token_types = arrays.get("token_type_ids")
            if token_types is not None:
                token_types = torch.from_numpy(np.asarray(token_types, dtype=np.int64)).to(self.device)
            probs = self.model.logits(input_ids.to(self.device), positions.to(self.device),
                                      token_type_ids=token_types).float().softmax(-1).cpu()
            best_p, best_i = probs.max(-1)
            truth_p = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            for r in range(len(input_ids)):
                ids = input_ids[r].clone()
                used = (labels[r] != pad_id).nonzero().flatten().tolist()
                slots = []
                for s in used:
                    position, truth, guess = int(positions[r, s]), int(labels[r, s]), int(best_i[r, s])
                    slots.append({"position": position, "truth": tokens[truth], "prediction": tokens[guess],
                                  "prob": float(best_p[r, s]), "truth_prob": float(truth_p[r, s]),
                                  "input": tokens[int(ids[position])], "correct": guess == truth})
                    ids[position] = truth
                real = ids[ids != pad_id].tolist()
                rows.append({"tokens": [tokens[i] for i in real], "slots": slots})
        return rows


def _pad(tensors: list[torch.Tensor], value) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_fill(result: dict) -> str:
    """A fill_masks result as lines for a terminal: the text, the top-1 filling, each mask's candidates."""
    lines = [result["text"], f"  -> {result['filled']}"]
    for n, candidates in enumerate(result["masks"], 1):
        lines.append(f"  [MASK] {n}: " + "  ".join(f"{c['token']} {c['prob']:.3f}" for c in candidates))
    return "\n".join(lines)


# --- HTML -----------------------------------------------------------------------------------------------------

PREDICTION_CSS = """
body { font: 15px/1.7 system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }
.row { margin: 0 0 1em; padding: .5em .8em; border-left: 3px solid #ddd; }
.row .n { color: #999; font-size: 80%; margin-right: .5em; }
.ok { background: #c8f0c8; border-radius: 3px; padding: 0 2px; cursor: help; }
.bad { background: #f8c8c8; border-radius: 3px; padding: 0 2px; cursor: help; }
.bad .truth { color: #555; font-size: 80%; margin-left: 3px; }
.bad .truth::before { content: "("; } .bad .truth::after { content: ")"; }
.special { color: #aaa; font-size: 80%; }
.summary { color: #555; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
"""


def row_html(row: dict, vocab) -> str:
    """One scored row (see `Predictor.score_rows`) as HTML: word pieces joined, each masked token green when the
    model's guess is right and red with the truth beside it when wrong; the probabilities on hover."""
    slots = {slot["position"]: slot for slot in row["slots"]}
    continuation = vocab.is_continuation
    ids_of = vocab.get
    parts = []
    for position, token in enumerate(row["tokens"]):
        slot = slots.get(position)
        shown = slot["prediction"] if slot else token
        piece_id = ids_of(token)
        glued = piece_id is not None and continuation[piece_id] and position > 0
        text = token
        if piece_id is not None and continuation[piece_id]:
            text = token[2:] if token.startswith("##") else token
        elif token.startswith("\u2581"):
            text = token[1:]
        if slot is None:
            if piece_id is not None and vocab.is_special[piece_id]:
                if token in ("[CLS]", "[PAD]") or (token == "[SEP]" and position == len(row["tokens"]) - 1):
                    continue
                body = f'<span class="special">{html.escape(token)}</span>'
            else:
                body = html.escape(text)
        else:
            title = (f"model: {slot['prediction']} p={slot['prob']:.3f}; truth: {slot['truth']} "
                     f"p={slot['truth_prob']:.3f}; input held {slot['input']}")
            # A piece is shown bare only where the truth is a piece too; elsewhere its '##' says what it is.
            guess = shown[2:] if glued and shown.startswith("##") else shown.lstrip("\u2581")
            if slot["correct"]:
                body = f'<span class="ok" title="{html.escape(title)}">{html.escape(guess)}</span>'
            else:
                body = (f'<span class="bad" title="{html.escape(title)}">{html.escape(guess)}'
                        f'<span class="truth">{html.escape(text)}</span></span>')
        parts.append(body if glued or not parts else " " + body)
    return "".join(parts)


def rows_html(rows: list[dict], vocab, first_row: int = 0) -> str:
    return "\n".join(f'<div class="row"><span class="n">{first_row + i}</span>{row_html(row, vocab)}</div>'
                     for i, row in enumerate(rows))


def write_shard_html(predictor: Predictor, split: Split, out_path: Path, rows: int = 20, start: int = 0) -> dict:
    """`predict --html`: `rows` shard rows from `start` scored by the model, one readable page; returns the
    numbers it shows (rows, masked, correct, accuracy)."""
    if rows < 1:
        raise BertError(f"-n must be at least 1, got {rows}")
    if start >= split.rows:
        raise BertError(f"split {split.name!r} has {split.rows} rows; there is no row {start}")
    stop = min(split.rows, start + rows)
    scored = predictor.score_rows(split, start, stop)
    masked = sum(len(row["slots"]) for row in scored)
    correct = sum(slot["correct"] for row in scored for slot in row["slots"])
    summary = {"rows": len(scored), "masked": masked, "correct": correct, "accuracy": correct / max(masked, 1)}
    pretrained = predictor.pretrained
    title = f"Masked-token predictions: {pretrained.source}"
    at_step = f", step {pretrained.step}" if pretrained.step else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{PREDICTION_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="summary">{html.escape(split.name)} rows {start}–{stop - 1}{at_step}:
{correct} of {masked} masked tokens right ({summary['accuracy']:.1%}).
<span class="ok">green</span>: the model's top guess is the original token;
<span class="bad">red<span class="truth">truth</span></span>: its guess, the original in brackets.
Hover for probabilities and for what the input held (the 80/10/10 rule keeps or randomises some masked tokens).</p>
{rows_html(scored, predictor.vocab, start)}
</body></html>
"""
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out_path), page)
    return summary
