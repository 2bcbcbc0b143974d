"""The tiny offline model: a byte-level BPE tokenizer and a small Llama, both trained here on synthetic text.

The base model is pretrained on problems written as prose ("... 5+3=8. The answer is 8.") so it learns the arithmetic
but never GSM8K's `<<a+b=c>>` annotations or the `#### N` answer line: SFT then has a real, measurable job. A plain
training loop is used (not a Trainer) because at this size per-step overhead, not FLOPs, sets the wall time.
"""

import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from looper.config import DataConfig, TinyModelConfig
from looper.data import pretraining_text, synthetic_splits

EOS, PAD = "<eos>", "<pad>"


def corpus(tiny: TinyModelConfig, data: DataConfig) -> list[str]:
    """Pretraining documents: fresh synthetic problems (never the SFT/eval problems) written as prose."""
    fresh = DataConfig(
        synthetic_train=tiny.corpus_size,
        synthetic_dev=1,
        synthetic_test=1,
        synthetic_seed=data.synthetic_seed + 7919,
        max_steps=data.max_steps,
        max_number=data.max_number,
    )
    held = {row["question"] for split in synthetic_splits(data).values() for row in split}
    return [pretraining_text(row) for row in synthetic_splits(fresh)["train"] if row["question"] not in held]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token, so numbers are spelled digit by digit."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def _blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded + [tokenizer.eos_token_id])
    usable = len(ids) // block_size * block_size
    return torch.tensor(ids[:usable]).view(-1, block_size)


def build(tiny: TinyModelConfig, data: DataConfig, seed: int, out_dir: Path, log=print) -> None:
    """Train the tokenizer and pretrain the model; save both (HF format) to `out_dir`."""
    torch.manual_seed(seed)
    texts = corpus(tiny, data)
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    blocks = _blocks(tokenizer, texts, tiny.block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, tiny.pretrain_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / tiny.pretrain_steps)))
        ),
    )
    order = random.Random(seed)
    start = time.time()
    model.train()
    bar = tqdm(total=tiny.pretrain_steps, desc="tiny base: pretraining", unit="step")  # (steps/s and ETA)
    for step in range(tiny.pretrain_steps):
        batch = blocks[order.sample(range(len(blocks)), tiny.pretrain_batch_size)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 100 == 0 or step == tiny.pretrain_steps - 1:
            log(
                f"tiny pretraining step {step + 1}/{tiny.pretrain_steps} loss {loss.item():.3f} "
                f"({time.time() - start:.0f}s)"
            )
    bar.close()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
