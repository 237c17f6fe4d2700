"""ModernBERT (Warner et al., 2024) for masked-LM pretraining: what transformers' `ModernBertForMaskedLM` computes.

A sibling of `train.model`'s BERT with the same interface, so the trainer drives either. Token embeddings only
(RoPE carries position); pre-norm layers with a fused bias-free `Wqkv`, a GeGLU MLP and no biases but the
decoder's (norm_bias adds LayerNorm biases); every `global_attn_every_n_layers`-th layer (layer 0 first) attends
globally with RoPE theta `global_rope_theta`, the others within `local_attention // 2` tokens either side with
`local_rope_theta`. The MLM head, and the last layer but for its keys and values, run at the masked positions
only. Submodules carry transformers' names, so the weight mapping (`train.hf.modernbert`) is one to one but for the
vocabulary padding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prep.errors import BertError
from train.attention import attention, key_mask
from train.dropout import dropout
from train.model import SIZES, PretrainingOutput, SavedModelConfig, gather_positions

INIT_STD = 0.02
INIT_CUTOFF = 2.0  # transformers' initializer_cutoff_factor: weights are truncated at +-2 std
ACTIVATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}
"""transformers' activation names we build -> F.gelu's `approximate`; one activation serves GeGLU and head."""


def glu_width(hidden: int) -> int:
    """GeGLU inner width for a hidden width: 8/3 * hidden, to the nearest multiple of 64.

    A GeGLU of width I holds 3 * hidden * I weights, BERT's MLP 2 * hidden * 4 * hidden, so 8/3 gives a ModernBERT of
    any named size BERT's parameter count (within 7% after rounding; exact at base, 768 -> 2048) and a comparison
    at equal size compares architectures, not widths. ModernBERT-base's own 1152 (1.5x) spends the difference on
    22 layers instead of 12; pass --ffn 1152 to get its width.
    """
    return max(64, round(8 * hidden / 3 / 64) * 64)


@dataclass(frozen=True)
class ModernBertConfig(SavedModelConfig):
    """The shape of a ModernBERT; saved as `model.json` beside every checkpoint and read back from there."""

    vocab_size: int
    """Real vocabulary entries (ids 0..vocab_size-1); taken from the dataset's vocab.txt."""
    hidden: int
    """Width of every token vector (--hidden)."""
    layers: int
    """Number of encoder layers (--layers)."""
    heads: int
    """Attention heads per layer; must divide --hidden (--heads)."""
    intermediate: int
    """GeGLU inner width: Wi projects to 2 * this (input and gate), Wo back from it (--ffn)."""
    hidden_activation: str = "gelu"
    """transformers' name of the GeGLU's and the head's activation: gelu (exact) or gelu_pytorch_tanh."""
    norm_bias: bool = False
    """Give every LayerNorm a bias; ModernBERT has none (transformers' norm_bias)."""
    max_positions: int = 8192
    """Rows may be at most this long; RoPE has no table, so this only bounds the input (--max-positions)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (all bias-free)."""
    global_rope_theta: float = 160000.0
    """RoPE base of the global attention layers."""
    local_rope_theta: float = 10000.0
    """RoPE base of the sliding-window attention layers."""
    local_attention: int = 128
    """Sliding window width: a local layer's token sees those at most local_attention // 2 positions away."""
    global_attn_every_n_layers: int = 3
    """Layers 0, n, 2n, ... attend globally; the others use the sliding window."""
    embedding_dropout: float = 0.0
    """Dropout after the embedding LayerNorm (--dropout)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities and on the attention block's output (--attention-dropout)."""
    mlp_dropout: float = 0.0
    """Dropout on the GeGLU product before Wo (--dropout)."""
    pad_id: int = 0
    """Id of [PAD]; positions holding it are masked out of attention by default."""
    pad_vocab_to: int = 64
    """Round the embedding/decoder rows up to a multiple of this for aligned matmuls."""
    nsp: bool = False
    """Always false: ModernBERT has no next-sentence head (the field keeps BERT's interface) (--nsp)."""
    arch: str = "modernbert"
    """The architecture's name, recorded in model.json so that the checkpoint loader picks this class."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions", "local_attention",
                     "global_attn_every_n_layers", "pad_vocab_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BertError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise BertError(f"--heads ({self.heads}) must divide --hidden ({self.hidden}) into an even head width "
                            f"(RoPE rotates pairs of dimensions)")
        if self.local_attention % 2:
            raise BertError(f"--local-attention must be even (a window of local_attention // 2 tokens either side "
                            f"of each token), got {self.local_attention}")
        for name in ("embedding_dropout", "attention_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BertError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        for name in ("norm_eps", "global_rope_theta", "local_rope_theta"):
            if not getattr(self, name) > 0:
                raise BertError(f"--{_flag(name)} must be a positive number, got {getattr(self, name)}")
        if self.hidden_activation not in ACTIVATIONS:
            raise BertError(f"hidden_activation must be one of {', '.join(ACTIVATIONS)}, "
                            f"got {self.hidden_activation!r}")
        if self.nsp:
            raise BertError("--nsp is not available with ModernBERT, which has no next-sentence head")
        if not 0 <= self.pad_id < self.vocab_size:
            raise BertError(f"pad id {self.pad_id} is outside the vocabulary of {self.vocab_size} entries")
        if self.arch != "modernbert":
            raise BertError(f"model config names arch {self.arch!r}, not 'modernbert'")

    @property
    def half_window(self) -> int:
        """How far a local layer looks either side: local_attention // 2, as transformers' `sliding_window`."""
        return self.local_attention // 2

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    def with_dropout(self, p: float) -> ModernBertConfig:
        """The same model with dropout `p` everywhere (embeddings, attention, MLP)."""
        return dataclasses.replace(self, embedding_dropout=p, attention_dropout=p, mlp_dropout=p)

    def summary(self) -> str:
        """The shape in words, for the start-up banner."""
        return (f"ModernBERT {self.layers} layers x {self.hidden} hidden, {self.heads} heads, GeGLU "
                f"{self.intermediate}, global every {self.global_attn_every_n_layers}, window {self.local_attention}")

    @classmethod
    def from_size(cls, name: str, vocab_size: int, **overrides) -> ModernBertConfig:
        """A named size of `train.model.SIZES` (layers, hidden; heads = hidden / 64, intermediate from
        `glu_width`); `overrides` replace any field.

        `ffn` is the GeGLU intermediate width; `dropout` sets embedding_dropout and mlp_dropout (unless they are
        given too). heads and intermediate follow an overridden hidden unless they are overridden too.
        """
        if name not in SIZES:
            raise BertError(f"unknown model size {name!r} for --size; choose one of {', '.join(SIZES)}")
        layers, hidden = SIZES[name]
        hidden = overrides.pop("hidden", hidden)
        if "ffn" in overrides:
            overrides["intermediate"] = overrides.pop("ffn")
        if "dropout" in overrides:
            p = overrides.pop("dropout")
            overrides.setdefault("embedding_dropout", p)
            overrides.setdefault("mlp_dropout", p)
        fields = {"layers": layers, "hidden": hidden, "heads": max(1, hidden // 64),
                  "intermediate": glu_width(hidden)}
        fields.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise BertError(f"options {unknown} do not apply to a ModernBERT model")
        return cls(vocab_size=vocab_size, **fields)



def _flag(field: str) -> str:
    return field.replace("_", "-")


def _layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden, eps=config.norm_eps, bias=config.norm_bias)


class Embeddings(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        # padding_idx as in transformers: the [PAD] row gets no gradient from the lookup (it still does from the
        # tied decoder).
        self.tok_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden, padding_idx=config.pad_id)
        self.norm = _layer_norm(config)
        self.dropout_p = config.embedding_dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dropout(self.norm(self.tok_embeddings(input_ids)), self.dropout_p, self.training)


class Rotary(nn.Module):
    """RoPE cos/sin tables [L, head_dim / 2] in float32 for one theta, cached per (length, device); not in the
    state dict.

    transformers' tables repeat these twice along the last dimension (computed alike, in float32); the rotation needs
    each half once, and a contiguous half broadcasts several times faster than a strided view of the whole.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, device)
        if key not in self._tables:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
            inv_freq = 1.0 / (self.theta ** exponents)
            angles = torch.arange(length, device=device).float()[:, None] * inv_freq
            self._tables[key] = (angles.cos(), angles.sin())
        return self._tables[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., L, D] rotated by position (half-split pairing), in x's dtype; cos, sin [L, D / 2] from `Rotary`, or
    any shape that broadcasts to x's halves (each token's own rows).

    The products transformers forms with its rotated copy of x, half by half, without making that copy; under
    autocast in bf16, as transformers casts its tables to q's dtype (in float32 it took twice as long on a CPU, with
    the attention after it in bf16 anyway).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        self.dropout_p = config.attention_dropout
        self.Wqkv = nn.Linear(config.hidden, 3 * config.hidden, bias=False)
        self.Wo = nn.Linear(config.hidden, config.hidden, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]; attn_mask bool broadcastable to [B, 1, L, L], true where a query may see a key
        (None: all).

        With `queries` (long [B, P]) only the tokens at those positions ask: the result is [B, P, H], attn_mask
        broadcasts to [B, 1, P, L], and the other tokens still serve as keys and values.
        """
        batch, length, hidden = x.shape
        # Wqkv's rows are q, k, v in turn, each split into heads: transformers' layout. One copy into [B, heads,
        # L, D] per part makes each contiguous, which the rotation and attention run faster on than strided views.
        if queries is None:
            qkv = self.Wqkv(x).view(batch, length, 3, self.heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
            q = apply_rotary(q, cos, sin)
        else:
            q_weight, kv_weight = self.Wqkv.weight.split((hidden, 2 * hidden))
            kv = F.linear(x, kv_weight).view(batch, length, 2, self.heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
            asked = F.linear(gather_positions(x, queries), q_weight)
            q = asked.view(batch, -1, self.heads, self.head_dim).transpose(1, 2).contiguous()
            q = apply_rotary(q, cos[queries].unsqueeze(1), sin[queries].unsqueeze(1))
        k = apply_rotary(k, cos, sin)
        out = attention(q, k, v, attn_mask, self.dropout_p if self.training else 0.0)
        return dropout(self.Wo(out.transpose(1, 2).reshape(batch, -1, hidden)), self.dropout_p, self.training)


class Mlp(nn.Module):
    """GeGLU: Wi -> GELU(input) * gate -> dropout -> Wo."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dropout_p = config.mlp_dropout
        self.approximate = ACTIVATIONS[config.hidden_activation]
        self.Wi = nn.Linear(config.hidden, 2 * config.intermediate, bias=False)
        self.Wo = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(dropout(F.gelu(value, approximate=self.approximate) * gate, self.dropout_p, self.training))


class Layer(nn.Module):
    def __init__(self, config: ModernBertConfig, index: int):
        super().__init__()
        self.is_global = config.is_global(index)
        # Layer 0's input is the embedding LayerNorm's output already, so ModernBERT normalises it only once.
        self.attn_norm = nn.Identity() if index == 0 else _layer_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = _layer_norm(config)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H], or with `queries` [B, P] the output at those positions only, [B, P, H]."""
        attended = self.attn(self.attn_norm(x), attn_mask, cos, sin, queries)
        if queries is not None:
            x = gather_positions(x, queries)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(nn.Module):
    """Embeddings, encoder layers and the final LayerNorm; returns the last hidden states [B, L, H]."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.layers))
        self.final_norm = _layer_norm(config)
        self.global_rotary = Rotary(config.head_dim, config.global_rope_theta)
        self.local_rotary = Rotary(config.head_dim, config.local_rope_theta)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] of any integer dtype (uint16 shards are widened here, once, on the device);
        token_type_ids is ignored (there are no segments), as BertModel's call shape has it; attention_mask [B, L]
        (true/1 = real token) defaults to input_ids != pad_id. Returns the last hidden states [B, L, H], or with
        `positions` [B, P] (any integer dtype) those at the positions, [B, P, H].

        With positions, the last layer computes only what they need: queries, Wo and GeGLU there, keys and values
        everywhere. Nothing after the last layer mixes tokens, so the vectors are the full run's (to float
        rounding) for a share of the last layer's work: 13% of a training step's FLOPs in `mini` at 30% masking.
        """
        length = input_ids.shape[1]
        if length > self.config.max_positions:
            raise BertError(f"rows of {length} tokens exceed the model's --max-positions {self.config.max_positions}")
        input_ids = input_ids.long()
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_id
        global_mask = key_mask(attention_mask)
        x = self.embeddings(input_ids)
        index = torch.arange(length, device=x.device)
        asking = len(self.layers) - 1 if positions is not None else None  # the layer that asks at the positions only
        local_mask = None  # [L, L] (or [B, 1, L, L]), built only if a local layer asks at every token
        if any(not layer.is_global for i, layer in enumerate(self.layers) if i != asking):
            local_mask = self._local_mask(global_mask, index[:, None], index)
        tables = {True: self.global_rotary(length, x.device), False: self.local_rotary(length, x.device)}
        for i, layer in enumerate(self.layers):
            queries = positions.long() if i == asking else None
            mask = global_mask if layer.is_global else local_mask
            if queries is not None and not layer.is_global:
                mask = self._local_mask(global_mask, queries[:, None, :, None], index)
            x = layer(x, mask, *tables[layer.is_global], queries)
        return self.final_norm(x)

    def _local_mask(self, keys: torch.Tensor | None, queries: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Where each query may look in a local layer: keys within half_window of it and not padding, or itself.

        queries holds the query positions, shaped to broadcast against the key positions `index` [L]: [L, 1] for
        every token (an [L, L] mask, [B, 1, L, L] with padding keys) or [B, 1, P, 1] for some ([B, 1, P, L]).
        The diagonal changes no real token's attention (it sees itself anyway) but keeps a padding query whose whole
        window is padding from a fully masked row, which some kernels turn into NaN.
        """
        distance = (queries - index).abs()
        if keys is None:
            return distance <= self.config.half_window
        return (keys & (distance <= self.config.half_window)) | (distance == 0)


class PredictionHead(nn.Module):
    """dense (no bias) -> the activation -> LayerNorm."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.approximate = ACTIVATIONS[config.hidden_activation]
        self.dense = nn.Linear(config.hidden, config.hidden, bias=False)
        self.norm = _layer_norm(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden), approximate=self.approximate))


class TiedDecoder(nn.Module):
    """The decoder's bias; its weight is the token embedding matrix, passed in."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., vocab_size]; the padding rows' columns are dropped."""
        return F.linear(hidden, weight, self.bias)[..., : self.vocab_size]


class ModernBertForPretraining(nn.Module):
    """The encoder with the masked-LM head; called exactly like `train.model.BertForPretraining`."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = PredictionHead(config)
        self.decoder = TiedDecoder(config)
        _init_weights(self, config)

    @property
    def encoder(self) -> ModernBertModel:
        """The encoder, under the name BERT's has (fine-tuning builds on it)."""
        return self.model

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table, which is also the decoder's weight."""
        return self.model.embeddings.tok_embeddings

    def forward(self, input_ids: torch.Tensor, mlm_positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                mlm_valid: torch.Tensor | None = None) -> PretrainingOutput:
        """MLM logits at the masked positions only; nsp_logits is always None. token_type_ids is ignored.

        mlm_positions [B, P] (any integer dtype) index into the L tokens of each row. Without `mlm_valid` the
        logits are [B, P, vocab_size] for every slot, padded ones included; with `mlm_valid` bool [B, P] they are
        [N, vocab_size] for the N true slots in row-major order (one host-device sync).
        """
        picked = self.model(input_ids, attention_mask=attention_mask, positions=mlm_positions)
        if mlm_valid is not None:
            picked = picked[mlm_valid.bool()]
        return PretrainingOutput(self.decoder(self.head(picked), self.input_embeddings.weight), None)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inference (call .eval() first): MLM logits [B, P, vocab_size] at `positions` [B, P], or
        [B, L, vocab_size] when None. token_type_ids is ignored."""
        hidden = self.model(input_ids, attention_mask=attention_mask, positions=positions)
        return self.decoder(self.head(hidden), self.input_embeddings.weight)


def _init_weights(model: ModernBertForPretraining, config: ModernBertConfig) -> None:
    """transformers' ModernBERT init: truncated normals cut at +-2 std; std 0.02 for the embeddings, Wqkv and Wi,
    0.02 / sqrt(2 * layers) for both Wo and the head's dense; LayerNorms 1 (biases 0), decoder bias 0.

    The tied decoder keeps the embeddings' init (transformers skips re-initialising a tied weight), and the [PAD]
    row is drawn like the rest (transformers' later ModernBERT init overwrites the zeroed row).
    """
    out_std = INIT_STD / math.sqrt(2.0 * config.layers)
    stds = {"model.embeddings.tok_embeddings.weight": INIT_STD, "head.dense.weight": out_std}
    for i in range(config.layers):
        prefix = f"model.layers.{i}"
        stds.update({f"{prefix}.attn.Wqkv.weight": INIT_STD, f"{prefix}.attn.Wo.weight": out_std,
                     f"{prefix}.mlp.Wi.weight": INIT_STD, f"{prefix}.mlp.Wo.weight": out_std})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in stds:
                std = stds[name]
                nn.init.trunc_normal_(param, std=std, a=-INIT_CUTOFF * std, b=INIT_CUTOFF * std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name == "decoder.bias" or name.endswith("norm.bias"):
                nn.init.zeros_(param)
            else:
                raise AssertionError(f"no init for {name}")


def flops_per_token(config: ModernBertConfig, seq_len: int, predictions_per_row: int | None = None,
                    sparse_last_layer: bool = False) -> float:
    """Training FLOPs (forward + backward) per input token, for MFU.

    6 per matmul weight per token (Kaplan et al.): per layer 4 * hidden^2 for attention and 3 * hidden *
    intermediate for the GeGLU. Attention scores and weighted sum add 12 * hidden per key a query sees: seq_len in
    a global layer; in a local one the keys within local_attention // 2 positions, on average over the row (fewer at
    its ends). The MLM head counts only at predictions_per_row of every seq_len tokens (None: at every token);
    with sparse_last_layer the last layer's queries, Wo and GeGLU do too, as ours computes them (its keys and
    values stay at every token), where transformers' sparse_prediction runs the last layer in full.
    """
    h = config.hidden
    share = 1.0 if predictions_per_row is None else predictions_per_row / seq_len
    radius = min(config.half_window, seq_len - 1)
    # A band of half-width r in an L x L matrix: L * (2r + 1) entries less the two cut-off corners of r(r+1)/2.
    local_keys = (seq_len * (2 * radius + 1) - radius * (radius + 1)) / seq_len
    total = 0.0
    for i in range(config.layers):
        asked = share if sparse_last_layer and i == config.layers - 1 else 1.0
        keys = seq_len if config.is_global(i) else local_keys
        total += 6 * (2 * h * h + asked * (2 * h * h + 3 * h * config.intermediate)) + 12 * h * keys * asked
    return total + 6 * (h * h + config.padded_vocab_size * h) * share
