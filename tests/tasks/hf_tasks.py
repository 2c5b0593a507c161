"""Tiny Hugging Face models as mixprec Tasks, built from configs (no downloads).

``mixprec train tests.tasks.hf_tasks:gpt2_task --precision bf16-mixed`` trains a 2-layer
GPT-2 on byte-level tokens of the Python standard library's sources (the same text the
``lm`` recipe uses); ``bert_task`` trains a 2-layer BERT classifier to tell real source
text from uniformly random bytes. Both are small enough for a CPU test in seconds.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

import mixprec
from mixprec.recipes.lm import load_stdlib_bytes

VOCAB_SIZE = 256  # byte-level: no tokenizer
MAX_BYTES = 2_000_000  # what the lm recipe reads by default (the validation split needs enough files)


def _crops(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return tokens[starts[:, None] + torch.arange(length)].contiguous()


def gpt2_task(steps_data_seed: int = 0, batch_size: int = 8, seq_len: int = 64, lr: float = 3e-3,
              eval_batches: int = 4) -> mixprec.Task:
    """GPT-2 (2 layers, n_embd 64, 2 heads, byte vocabulary) on stdlib source bytes.

    ``steps_data_seed`` is added to the run's seed for the data stream, so the same model
    init can be trained on a different batch order. ``evaluate`` reports the held-out loss.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if not 1 <= seq_len <= 64:
        raise mixprec.UsageError(f"gpt2_task: seq_len must be in [1, 64] (n_positions=64), got {seq_len!r}")
    train_tokens, val_tokens = load_stdlib_bytes(MAX_BYTES)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB_SIZE, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)

    def build_model() -> nn.Module:
        return GPT2LMHeadModel(config)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def train_batches(seed: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(int(seed) + int(steps_data_seed))
        high = len(train_tokens) - seq_len
        while True:
            yield _crops(train_tokens, torch.randint(0, high, (batch_size,), generator=gen), seq_len)

    def loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, labels=x).loss

    val_starts = torch.linspace(0, len(val_tokens) - seq_len - 1, eval_batches * batch_size).long()
    val = [_crops(val_tokens, s, seq_len) for s in val_starts.split(batch_size)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            total = sum(float(loss(model, x)) for x in val)
        return {"val_loss": total / len(val)}

    return mixprec.Task(name="hf-gpt2", build_model=build_model, build_optimizer=build_optimizer,
                        train_batches=train_batches, loss=loss, evaluate=evaluate)


def bert_task(batch_size: int = 8, seq_len: int = 32, lr: float = 1e-3, eval_batches: int = 4) -> mixprec.Task:
    """BERT (2 layers, hidden 64, 2 heads) classifying a byte sequence: source text (0) or random bytes (1).

    Half of each batch is crops of stdlib source, half uniformly random bytes, shuffled;
    the byte statistics differ so much that a few steps learn it. ``evaluate`` reports
    held-out accuracy and loss.
    """
    from transformers import BertConfig, BertForSequenceClassification

    train_tokens, val_tokens = load_stdlib_bytes(MAX_BYTES)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        vocab_size=VOCAB_SIZE, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def batch(tokens: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n_text = batch_size // 2
        text = _crops(tokens, torch.randint(0, len(tokens) - seq_len, (n_text,), generator=gen), seq_len)
        noise = torch.randint(0, VOCAB_SIZE, (batch_size - n_text, seq_len), generator=gen)
        x = torch.cat([text, noise])
        y = torch.cat([torch.zeros(n_text, dtype=torch.long), torch.ones(batch_size - n_text, dtype=torch.long)])
        order = torch.randperm(batch_size, generator=gen)
        return x[order], y[order]

    def build_model() -> nn.Module:
        return BertForSequenceClassification(config)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            yield batch(train_tokens, gen)

    def loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = b
        return model(input_ids=x, labels=y).loss

    val_gen = torch.Generator().manual_seed(12345)
    val = [batch(val_tokens, val_gen) for _ in range(eval_batches)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        correct, total, loss_sum = 0, 0, 0.0
        with torch.no_grad():
            for x, y in val:
                out = model(input_ids=x, labels=y)
                correct += int((out.logits.argmax(-1) == y).sum())
                total += len(y)
                loss_sum += float(out.loss)
        return {"accuracy": correct / total, "val_loss": loss_sum / len(val)}

    return mixprec.Task(name="hf-bert", build_model=build_model, build_optimizer=build_optimizer,
                        train_batches=train_batches, loss=loss, evaluate=evaluate)
