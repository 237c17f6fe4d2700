"""The BERT model: encoder and pretraining heads (its Hugging Face mapping lives in `train.hf.bert`).

Plain PyTorch. Attention runs through `train.attention`, so each device picks its fused kernel and precision; dropout
through `train.dropout`. The MLM head runs only at the masked positions: it skips most of the largest matmul of a
small model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prep.errors import BertError
from train.attention import attention, key_mask
from train.dropout import Dropout

# (layers, hidden) per named size; heads = hidden / 64 and ffn = 4 * hidden, as in Turc et al. and BERT itself.
SIZES = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}
NORMS = ("post", "pre")
INIT_STD = 0.02


class SavedModelConfig:
    """What every architecture's config shares: it is saved as model.json beside each checkpoint and read back, and
    its vocabulary rows are padded for aligned matmuls."""

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding/decoder matrix: vocab_size rounded up to a multiple of pad_vocab_to."""
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping):
        """Reads back `as_dict()`; refuses unknown fields rather than silently dropping them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BertError(f"model config has unknown fields {unknown}: was it written by a newer berttrain?")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig(SavedModelConfig):
    """The shape of a BERT; saved as `model.json` beside every checkpoint and read back from there."""

    vocab_size: int
    """Real vocabulary entries (ids 0..vocab_size-1); taken from the dataset's vocab.txt."""
    hidden: int
    """Width of every token vector (--hidden)."""
    layers: int
    """Number of encoder layers (--layers)."""
    heads: int
    """Attention heads per layer; must divide --hidden (--heads)."""
    ffn: int
    """Inner width of the feed-forward block, usually 4 * hidden (--ffn)."""
    max_positions: int = 512
    """Rows may be at most this long: the size of the position embedding table (--max-positions)."""
    type_vocab_size: int = 2
    """Number of segment (token type) embeddings; 2 for sentence A/B."""
    dropout: float = 0.1
    """Dropout on embeddings and on every residual branch (--dropout)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (--attention-dropout)."""
    norm: str = "post"
    """'post': LayerNorm after each residual add (original BERT, exportable); 'pre': before each block (--norm)."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm; 1e-12 as in BERT."""
    pad_id: int = 0
    """Id of [PAD]; positions holding it are masked out of attention by default."""
    nsp: bool = False
    """Build the next-sentence-prediction head (pooler + 2-way classifier) (--nsp)."""
    pad_vocab_to: int = 64
    """Round the embedding/decoder rows up to a multiple of this for aligned matmuls (30522 -> 30528)."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden", "layers", "heads", "ffn", "max_positions", "type_vocab_size",
                     "pad_vocab_to"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BertError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden % self.heads:
            raise BertError(f"--heads ({self.heads}) must divide --hidden ({self.hidden})")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BertError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.norm not in NORMS:
            raise BertError(f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if not self.layer_norm_eps > 0:
            raise BertError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise BertError(f"pad id {self.pad_id} is outside the vocabulary of {self.vocab_size} entries")

    def with_dropout(self, p: float) -> ModelConfig:
        """The same model with dropout `p` everywhere (embeddings, residual branches, attention)."""
        return dataclasses.replace(self, dropout=p, attention_dropout=p)

    def summary(self) -> str:
        """The shape in words, for the start-up banner."""
        return (f"BERT {self.layers} layers x {self.hidden} hidden, {self.heads} heads, ffn {self.ffn}, {self.norm}-LN"
                + (", NSP head" if self.nsp else ""))

    @classmethod
    def from_size(cls, name: str, vocab_size: int, **overrides) -> ModelConfig:
        """A named size (tiny, mini, small, medium, base, large); `overrides` replace any field.

        heads and ffn follow an overridden hidden unless they are overridden too.
        """
        if name not in SIZES:
            raise BertError(f"unknown model size {name!r} for --size; choose one of {', '.join(SIZES)}")
        layers, hidden = SIZES[name]
        hidden = overrides.pop("hidden", hidden)
        fields = {"layers": layers, "hidden": hidden, "heads": max(1, hidden // 64), "ffn": 4 * hidden}
        fields.update(overrides)
        return cls(vocab_size=vocab_size, **fields)



def _flag(field: str) -> str:
    return field.replace("_", "-")


class PretrainingOutput(NamedTuple):
    mlm_logits: torch.Tensor
    """[B, P, vocab_size], or [N, vocab_size] for the N slots where `mlm_valid` is true (row-major order)."""
    nsp_logits: torch.Tensor | None
    """[B, 2] when the config has the NSP head, else None."""


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(config.padded_vocab_size, config.hidden)
        self.position = nn.Embedding(config.max_positions, config.hidden)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.dropout_p = config.attention_dropout
        # Separate q/k/v keep the mapping onto transformers' names one-to-one.
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)
        self.output = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]; attn_mask bool [B, 1, 1, L], true where a key may be attended to, or None for
        all. With `queries` (long [B, P]) only the tokens at those positions ask, and the result is [B, P, H]."""
        batch, length, hidden = x.shape

        def split(t):
            return t.view(batch, -1, self.heads, hidden // self.heads).transpose(1, 2)

        asking = x if queries is None else gather_positions(x, queries)
        q, k, v = split(self.query(asking)), split(self.key(x)), split(self.value(x))
        out = attention(q, k, v, attn_mask, self.dropout_p if self.training else 0.0)
        return self.output(out.transpose(1, 2).reshape(batch, -1, hidden))


class Layer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden, config.ffn)
        self.ffn_out = nn.Linear(config.ffn, config.hidden)
        self.ffn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(F.gelu(self.ffn_in(x)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H], or with `queries` [B, P] the output at those positions only, [B, P, H]."""
        residual = x if queries is None else gather_positions(x, queries)
        if self.pre_norm:
            x = residual + self.dropout(self.attention(self.attention_norm(x), attn_mask, queries))
            return x + self.dropout(self._ffn(self.ffn_norm(x)))
        x = self.attention_norm(residual + self.dropout(self.attention(x, attn_mask, queries)))
        return self.ffn_norm(x + self.dropout(self._ffn(x)))


class BertModel(nn.Module):
    """Embeddings and encoder layers; returns the last hidden states [B, L, H]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        # Both norms keep the embedding LayerNorm, so "pre" and "post" differ only inside the layers.
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.layers))
        # Pre-LN leaves the residual stream unnormalised, so the output needs one last LayerNorm.
        self.final_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps) if config.norm == "pre" else None

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] of any integer dtype (uint16 shards are widened here, once, on the device).

        token_type_ids [B, L] defaults to zeros; attention_mask [B, L] (true/1 = real token) defaults to
        input_ids != pad_id. Returns the last hidden states [B, L, H], or with `positions` [B, P] (any integer
        dtype) those at the positions, [B, P, H]: the last layer then asks only there (keys and values stay at
        every token), which gives the full run's vectors (to float rounding) for a share of its work.
        """
        if input_ids.shape[1] > self.config.max_positions:
            raise BertError(f"rows of {input_ids.shape[1]} tokens exceed the model's --max-positions "
                            f"{self.config.max_positions}")
        input_ids = input_ids.long()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_id
        attn_mask = key_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids.long())
        for i, layer in enumerate(self.layers):
            x = layer(x, attn_mask, positions.long() if positions is not None and i == len(self.layers) - 1 else None)
        return x if self.final_norm is None else self.final_norm(x)


class MlmHead(nn.Module):
    """dense -> GELU -> LayerNorm -> tied decoder; applied to the hidden states it is given, nothing more."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., vocab_size]."""
        logits = F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)
        # The padded rows only align the matmul; dropping their columns gives them exactly zero probability.
        return logits[..., : self.vocab_size]


class BertForPretraining(nn.Module):
    """The encoder with the masked-LM head (and the NSP head when config.nsp)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = BertModel(config)
        self.mlm_head = MlmHead(config)
        if config.nsp:
            self.pooler = nn.Linear(config.hidden, config.hidden)
            self.nsp_head = nn.Linear(config.hidden, 2)
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, mlm_positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                mlm_valid: torch.Tensor | None = None) -> PretrainingOutput:
        """MLM logits at the masked positions only, plus NSP logits when config.nsp.

        mlm_positions [B, P] (any integer dtype) index into the L tokens of each row. Without `mlm_valid` the
        logits are [B, P, vocab_size] for every slot, padded ones included: mask those in the loss
        (ignore_index), which never syncs with the device. With `mlm_valid` bool [B, P] (e.g.
        mlm_labels != pad_id) the logits are [N, vocab_size] for the N true slots in row-major order, matching
        `mlm_labels[mlm_valid]`; boolean indexing costs one host-device sync.
        """
        if self.config.nsp:  # the pooler reads [CLS], position 0: asked for first
            mlm_positions = F.pad(mlm_positions.long(), (1, 0))
        picked = self.encoder(input_ids, token_type_ids, attention_mask, positions=mlm_positions)
        nsp_logits = None
        if self.config.nsp:
            nsp_logits = self.nsp_head(torch.tanh(self.pooler(picked[:, 0])))
            picked = picked[:, 1:]
        if mlm_valid is not None:
            picked = picked[mlm_valid.bool()]
        return PretrainingOutput(self.mlm_head(picked, self.encoder.embeddings.word.weight), nsp_logits)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inference (call .eval() first): MLM logits [B, P, vocab_size] at `positions` [B, P], or
        [B, L, vocab_size] when None."""
        hidden = self.encoder(input_ids, token_type_ids, attention_mask, positions=positions)
        return self.mlm_head(hidden, self.encoder.embeddings.word.weight)


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, H], positions [B, P] -> [B, P, H]: row b's vectors at its own positions."""
    index = positions.long().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def _init_weights(module: nn.Module) -> None:
    """BERT's init: normal(0, 0.02) weights, zero biases, LayerNorm 1/0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, MlmHead):
        nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (the tied decoder counts once), vocabulary padding included."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: ModelConfig, seq_len: int, predictions_per_row: int | None = None,
                    sparse_last_layer: bool = False) -> float:
    """Training FLOPs (forward + backward) per input token, for MFU.

    6 per matmul weight per token (Kaplan et al.), plus 12 * hidden * seq_len per layer for the attention
    scores and weighted sum. The MLM head counts only at predictions_per_row of every seq_len tokens, as it runs;
    None counts it at every token. With sparse_last_layer the last layer's query, output projection, FFN and
    attention count at those tokens too (and [CLS] with NSP), as ours runs them; its keys and values at every
    token. Embedding lookups are not matmuls and count nothing.
    """
    h, f = config.hidden, config.ffn
    share = 1.0 if predictions_per_row is None else predictions_per_row / seq_len
    asked = (predictions_per_row + config.nsp) / seq_len if sparse_last_layer and predictions_per_row else 1.0
    layer = 4 * h * h + 2 * h * f
    encoder = (config.layers - 1) * layer + 2 * h * h + asked * (2 * h * h + 2 * h * f)
    head = h * h + config.padded_vocab_size * h
    pooler = (h * h + 2 * h) / seq_len if config.nsp else 0.0
    attention = 12 * h * seq_len * (config.layers - 1 + asked)
    return 6 * (encoder + head * share + pooler) + attention
