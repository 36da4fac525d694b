"""A public model zoo: real architectures from small configs, for memprof's accuracy checks.

Every entry builds a :class:`memprof.Workload` (model, AdamW, a sample batch, a step function
where the default loss does not fit) with random weights from a fixed seed; nothing is
downloaded. The configs are tiny (2 layers, width 64-128, sequences of 32-64, batches of 2-4)
so one real CPU training step takes a fraction of a second. transformers models use
``attn_implementation="eager"`` throughout, so attention is the model's own Python code on
every device (sdpa picks a different kernel per device and dtype).

Import it as ``from benchmarks.zoo import ZOO`` from the repository root, or load the file by
path. Models needing transformers are skipped (``available()`` is False) when it is absent.

Example::

    from benchmarks.zoo import ZOO, by_name
    workload = by_name("llama-gqa").build()
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprof.advisor import Workload

SEED = 0
EAGER = "eager"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``build()`` returns a fresh, seeded Workload each call."""

    name: str
    family: str
    factory: Callable[[], Workload]
    needs: str | None = None  # an optional package the model needs ("transformers")
    notes: str = ""

    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None

    def build(self) -> Workload:
        torch.manual_seed(SEED)
        return self.factory()


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _ids(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


# ------------------------------------------------------------------ decoder language models
def gpt2() -> Workload:
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=64,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0,
        attn_implementation=EAGER,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = _ids(512, 4, 64)
    return Workload(model, _adamw(model), {"input_ids": ids, "labels": ids}, steps=2)


def llama_gqa() -> Workload:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
        attn_implementation=EAGER,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = _ids(512, 4, 64)
    return Workload(model, _adamw(model), {"input_ids": ids, "labels": ids}, steps=2)


def mistral_gqa() -> Workload:
    import transformers

    config = transformers.MistralConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=512, max_position_embeddings=64, sliding_window=32,
        attn_implementation=EAGER,
    )
    model = transformers.MistralForCausalLM(config)
    ids = _ids(512, 2, 64)
    return Workload(model, _adamw(model), {"input_ids": ids, "labels": ids}, steps=2)


# ------------------------------------------------------------------ encoders
def bert() -> Workload:
    import transformers

    config = transformers.BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        vocab_size=512, max_position_embeddings=64, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, attn_implementation=EAGER,
    )
    model = transformers.BertForMaskedLM(config)
    ids = _ids(512, 4, 64)
    mask = torch.ones(4, 64, dtype=torch.long)
    mask[:, 48:] = 0
    return Workload(
        model, _adamw(model), {"input_ids": ids, "attention_mask": mask, "labels": ids}, steps=2
    )


def roberta() -> Workload:
    import transformers

    config = transformers.RobertaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        vocab_size=512, max_position_embeddings=72, num_labels=3, attn_implementation=EAGER,
    )
    model = transformers.RobertaForSequenceClassification(config)
    ids = _ids(512, 4, 64)
    ids[:, 0] = 0  # <s>; the padding id 1 is avoided so position ids stay simple
    ids[ids == 1] = 2
    return Workload(
        model, _adamw(model), {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 0])}, steps=2
    )


# ------------------------------------------------------------------ encoder-decoders
def t5() -> Workload:
    import transformers

    config = transformers.T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        vocab_size=512, tie_word_embeddings=True, dropout_rate=0.1, pad_token_id=0,
        decoder_start_token_id=0, eos_token_id=1, attn_implementation=EAGER,
    )
    model = transformers.T5ForConditionalGeneration(config)
    batch = {"input_ids": _ids(512, 4, 48), "labels": _ids(512, 4, 32)}
    return Workload(model, _adamw(model), batch, steps=2)


def bart() -> Workload:
    import transformers

    config = transformers.BartConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=512,
        max_position_embeddings=64, dropout=0.1, attn_implementation=EAGER,
    )
    model = transformers.BartForConditionalGeneration(config)
    ids = _ids(512, 4, 48)
    ids[ids == config.pad_token_id] = 5
    labels = _ids(512, 4, 32)
    labels[labels == config.pad_token_id] = 5
    return Workload(model, _adamw(model), {"input_ids": ids, "labels": labels}, steps=2)


# ------------------------------------------------------------------ vision
def vit() -> Workload:
    import transformers

    config = transformers.ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
        hidden_dropout_prob=0.1, attn_implementation=EAGER,
    )
    model = transformers.ViTForImageClassification(config)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 10, (4,))}
    return Workload(model, _adamw(model), batch, steps=2)


def resnet_bn() -> Workload:
    import transformers

    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
        layer_type="basic", num_labels=10,
    )
    model = transformers.ResNetForImageClassification(config)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 10, (4,))}
    return Workload(model, _adamw(model), batch, steps=2)


def convnext() -> Workload:
    import transformers

    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, patch_size=2,
        num_labels=10, drop_path_rate=0.0,
    )
    model = transformers.ConvNextForImageClassification(config)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 10, (4,))}
    return Workload(model, _adamw(model), batch, steps=2)


# ------------------------------------------------------------------ speech and multimodal
def whisper() -> Workload:
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=512, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=32, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        attn_implementation=EAGER,
    )
    model = transformers.WhisperForConditionalGeneration(config)
    # the encoder's two convolutions halve the frames: 64 mel frames -> 32 positions
    batch = {"input_features": torch.randn(2, 16, 64), "labels": _ids(512, 2, 16).clamp(min=3)}
    return Workload(model, _adamw(model), batch, steps=2)


def _clip_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch, return_loss=True).loss


def clip() -> Workload:
    import transformers

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 512, "max_position_embeddings": 32,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    config = transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=32, attn_implementation=EAGER
    )
    model = transformers.CLIPModel(config)
    batch = {"input_ids": _ids(512, 4, 32), "pixel_values": torch.randn(4, 3, 32, 32)}
    return Workload(model, _adamw(model), batch, step_fn=_clip_loss, steps=2)


# ------------------------------------------------------------------ recurrent
class TiedLSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> decoder sharing the embedding's weight (tied)."""

    def __init__(self, vocab: int = 512, width: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=layers, batch_first=True, dropout=0.1)
        self.decoder = nn.Linear(width, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(ids))
        return self.decoder(out)


def _next_token_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    ids, targets = batch
    logits = model(ids)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lstm_tied() -> Workload:
    model = TiedLSTMLanguageModel()
    ids = _ids(512, 4, 33)
    return Workload(
        model, _adamw(model), (ids[:, :-1], ids[:, 1:]), step_fn=_next_token_loss, steps=2
    )


class GRUClassifier(nn.Module):
    """A bidirectional GRU over feature frames, mean-pooled into a linear classifier."""

    def __init__(self, features: int = 32, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(features, width, num_layers=2, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(frames)
        return self.head(self.norm(out.mean(dim=1)))


def gru() -> Workload:
    model = GRUClassifier()
    batch = (torch.randn(4, 48, 32), torch.randint(0, 10, (4,)))
    return Workload(model, _adamw(model), batch, steps=2)


# ------------------------------------------------------------------ plain torch
class Seq2SeqTransformer(nn.Module):
    """nn.Transformer between two token embeddings, with a causal mask kept as a buffer."""

    def __init__(self, vocab: int = 512, width: int = 64, seq: int = 32) -> None:
        super().__init__()
        self.source = nn.Embedding(vocab, width)
        self.target = nn.Embedding(vocab, width)
        self.transformer = nn.Transformer(
            d_model=width, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
            dim_feedforward=128, dropout=0.1, batch_first=True,
        )
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq))
        self.head = nn.Linear(width, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor | None = None) -> torch.Tensor:
        # one argument too: the advisor's drift check calls model(batch[0])
        tgt = src if tgt is None else tgt
        mask = self.causal[: tgt.shape[1], : tgt.shape[1]]
        out = self.transformer(self.source(src), self.target(tgt), tgt_mask=mask)
        return self.head(out)


def _seq2seq_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    src, tgt = batch
    logits = model(src, tgt[:, :-1])
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1)
    )


def torch_transformer() -> Workload:
    model = Seq2SeqTransformer()
    batch = (_ids(512, 4, 32), _ids(512, 4, 33))
    return Workload(model, _adamw(model), batch, step_fn=_seq2seq_loss, steps=2)


class AttentionBlock(nn.Module):
    """Pre-norm self-attention and MLP, run under torch.utils.checkpoint when asked."""

    def __init__(self, width: int, heads: int, checkpointed: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=0.1, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.checkpointed = checkpointed

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            out: torch.Tensor = checkpoint(self._body, x, use_reentrant=False)
            return out
        return self._body(x)


class CheckpointedAttentionLM(nn.Module):
    """Token embedding plus a learned-position buffer, four attention blocks (the middle two
    checkpointed), and an output layer tied to the embedding."""

    def __init__(self, vocab: int = 512, width: int = 64, seq: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.register_buffer("positions", torch.randn(seq, width) * 0.02)
        self.blocks = nn.ModuleList(
            AttentionBlock(width, 4, checkpointed=i in (1, 2)) for i in range(4)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids) + self.positions[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def mha_checkpointed() -> Workload:
    model = CheckpointedAttentionLM()
    ids = _ids(512, 4, 65)
    return Workload(
        model, _adamw(model), (ids[:, :-1], ids[:, 1:]), step_fn=_next_token_loss, steps=2
    )


_HF = "transformers"

#: The zoo, in the order the benchmark runs it.
ZOO: tuple[ZooModel, ...] = (
    ZooModel("gpt2", "decoder LM", gpt2, _HF, "dropout on"),
    ZooModel("llama-gqa", "decoder LM", llama_gqa, _HF, "4 query heads, 2 KV heads"),
    ZooModel("mistral-gqa", "decoder LM", mistral_gqa, _HF, "multi-query, sliding window"),
    ZooModel("bert", "encoder", bert, _HF, "masked LM, dropout, padding mask"),
    ZooModel("roberta", "encoder", roberta, _HF, "sequence classification"),
    ZooModel("t5", "encoder-decoder", t5, _HF, "tied embeddings, dropout"),
    ZooModel("bart", "encoder-decoder", bart, _HF, "dropout"),
    ZooModel("vit", "vision", vit, _HF, "image classification"),
    ZooModel("resnet-bn", "vision", resnet_bn, _HF, "BatchNorm"),
    ZooModel("convnext", "vision", convnext, _HF, "LayerNorm, depthwise convolutions"),
    ZooModel("whisper", "speech", whisper, _HF, "log-mel input, encoder-decoder"),
    ZooModel("clip", "multimodal", clip, _HF, "contrastive loss, two towers"),
    ZooModel("lstm-tied", "recurrent", lstm_tied, None, "decoder tied to the embedding"),
    ZooModel("gru", "recurrent", gru, None, "bidirectional, 2 layers"),
    ZooModel("nn-transformer", "plain torch", torch_transformer, None, "causal mask buffer"),
    ZooModel("mha-checkpointed", "plain torch", mha_checkpointed, None,
             "torch.utils.checkpoint blocks, tied head, buffer"),
)


def by_name(name: str) -> ZooModel:
    """The zoo entry called ``name`` (KeyError listing the names otherwise)."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(f"no zoo model {name!r}; the zoo has: {', '.join(e.name for e in ZOO)}")
