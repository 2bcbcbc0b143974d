"""Build a reasoning model to run `experiment=deepseek_qlora` on without downloading one: random weights of a given
architecture (bench_gpu's ARCHS, default Llama-3-8B's shape) and a tokenizer trained here on GSM8K text, carrying
DeepSeek-R1-Distill's special tokens and an R1-style chat template (BOS written by the template; the generation
prompt opens `<think>\n`).

    python scripts/reasoning_probe.py OUT_DIR --data DIR_WITH_GSM8K_TRAIN_JSONL [--arch llama3-8b] [--dominant-head]

`--dominant-head` makes greedy comparisons meaningful on random weights (near-flat logits otherwise flip their argmax
under any change of reduction order): the final norm keeps feature 0 only and the LM head reads only that feature,
so each step's argmax follows one feature of the model's output; `--eos-weight` sets the EOS row's weight on it (0:
rows run to their limit).

The vocabulary is the tokenizer's (a few thousand tokens), so `</think>` and EOS each come up about once in that many
sampled tokens: traces close their think block, end, or hit the token limit in proportions a probe can report.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
TEMPLATE = (  # DeepSeek-R1-Distill's, shortened: reasoning dropped from earlier turns, `<think>\n` opened
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '" + USER + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '"
    + ASSISTANT
    + "' + m['content'].split('</think>')[-1] + '"
    + EOS
    + "' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '"
    + ASSISTANT
    + "<think>\\n' }}{% endif %}"
)


def r1_tokenizer(texts: list[str], vocab_size: int, bos_in_template: bool = True):
    """A byte-level BPE trained on `texts` with R1's special tokens and an R1-style chat template that writes BOS
    itself, or (`bos_in_template=False`) a tokenizer that adds BOS as its special token and a template that does
    not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BOS, EOS, USER, ASSISTANT, "<think>", "</think>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    if not bos_in_template:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )
    fast.chat_template = ("{{ bos_token }}" if bos_in_template else "") + TEMPLATE
    return fast


@torch.no_grad()
def dominant_head(model, eos_id: int, eos_weight: float) -> None:
    """Zero the final norm's weight except feature 0 (set to 1) and let the LM head read only that feature (column 0
    drawn with std 0.02, EOS's entry `eos_weight`): each greedy step's argmax follows one feature of the output."""
    model.model.norm.weight.zero_()
    model.model.norm.weight[0] = 1.0
    head = model.lm_head.weight
    column = torch.randn(head.shape[0], generator=torch.Generator().manual_seed(1)) * 0.02
    column[eos_id] = eos_weight
    head.zero_()
    head[:, 0] = column.to(head)


def main() -> None:
    from bench_gpu import ARCHS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="a directory with GSM8K's train.jsonl")
    parser.add_argument("--arch", default="llama3-8b", choices=sorted(ARCHS))
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--dominant-head", action="store_true", help="argmax follows feature 0 (greedy comparisons)")
    parser.add_argument("--eos-weight", type=float, default=0.0, help="with --dominant-head: EOS's weight on it")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = [json.loads(line) for line in (args.data / "train.jsonl").read_text().splitlines() if line.strip()]
    fast = r1_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], args.vocab)
    shape = {**ARCHS[args.arch], "vocab_size": len(fast)}
    config = LlamaConfig(
        **shape,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    if args.dominant_head:
        dominant_head(model, fast.eos_token_id, args.eos_weight)
    model.save_pretrained(args.out)
    fast.save_pretrained(args.out)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, vocabulary {len(fast)}")


if __name__ == "__main__":
    main()
