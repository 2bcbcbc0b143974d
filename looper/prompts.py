"""Prompts and completions as the model sees them: the one prompt builder and the token conventions.

Owns `build_prompt` (an arm's or eval's prompt in the model's format: template or chat, with the reasoning model's
think block), `build_completion` (a solution as SFT trains on it), `encode_prompt` / `encode_completion` (the ids
every stage feeds the model: exactly one BOS, EOS after a completion) and `check_context` (prompts that do not fit).
Needs a tokenizer, never a model's weights.
"""

import logging
import re
from typing import Optional, Sequence

from looper.config import ArmConfig, ModelConfig

log = logging.getLogger(__name__)


# GSM8K-Platinum's published prompt (MadryLab/platinum-benchmarks); its harness drops "Think step-by-step. " for
# reasoning models, which think anyway
PLATINUM_PROMPT = (
    "Solve the following math word problem.\n\n{question}\n\nThink step-by-step. Then, provide the "
    'final answer as a single integer in the format "Answer: XXX" with no extra formatting.'
)
PLATINUM_PROMPT_REASONING = PLATINUM_PROMPT.replace("Think step-by-step. ", "")
_ANNOTATION = re.compile(r"<<[^<>]*>>")


def build_prompt(
    model: ModelConfig,
    tokenizer,
    question: str,
    arm: Optional[ArmConfig] = None,
    shots: Sequence[dict] = (),
    official: bool = False,
) -> str:
    """The text a model is given for `question`, in its own format (prompt template or chat template).

    `arm` adds its system prompt (as a system turn, or before the question where `model.system_prompt=user`) and
    appends its style to the question; `shots` (dicts with `question` and `answer`) come first as solved examples;
    `official` wraps each question in GSM8K-Platinum's published prompt (its reasoning-model variant for
    `model.reasoning=think`).
    """
    official_prompt = PLATINUM_PROMPT_REASONING if model.reasoning == "think" else PLATINUM_PROMPT

    def user(text: str) -> str:
        text = official_prompt.format(question=text) if official else text
        return f"{text}\n{arm.style}" if arm is not None and arm.style else text

    system = arm.system_prompt if arm is not None else ""
    if system and model.system_prompt == "user":
        inner = user
        system = ""

        def user(text: str) -> str:
            return f"{arm.system_prompt}\n\n{inner(text)}"

    if model.prompt_format == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        for shot in shots:
            messages += [
                {"role": "user", "content": user(shot["question"])},
                {"role": "assistant", "content": build_completion(model, shot["answer"])},
            ]
        messages.append({"role": "user", "content": user(question)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = model.system_template.format(system=system) if system else ""
    for shot in shots:
        prefix += (
            model.prompt_template.format(question=user(shot["question"]))
            + build_completion(model, shot["answer"])
            + "\n\n"
        )
    return prefix + model.prompt_template.format(question=user(question))


def build_completion(model: ModelConfig, solution: str, prompt: Optional[str] = None) -> str:
    """A GSM8K worked solution written as the model should produce it (SFT target), through
    `model.completion_template`: `{solution}` is all of it, `{reasoning}` its steps before the `#### N` line without
    GSM8K's calculator annotations (`48/2 = <<48/2=24>>24` reads `48/2 = 24`) and `{answer}` N. For a reasoning
    model whose `prompt` does not already open the think block, the completion opens it."""
    reasoning, _, answer = solution.rpartition("####")
    if not reasoning:
        reasoning, answer = solution, ""
    completion = model.completion_template.format(
        solution=solution, reasoning=_ANNOTATION.sub("", reasoning).rstrip(), answer=answer.strip()
    )
    if model.reasoning == "think" and prompt is not None and not prompt.rstrip().endswith(model.think_open):
        completion = f"{model.think_open}\n{completion}"
    return completion


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The token ids of a rendered prompt with exactly one BOS, whether or not a chat template wrote it: a prompt
    that starts with the BOS token's text is tokenized as it is, any other with the tokenizer's special tokens. SFT,
    DPO, rollouts and evaluation all feed the model these ids."""
    bos = tokenizer.bos_token
    starts_with_bos = bool(bos) and prompt.startswith(bos)
    return tokenizer(prompt, add_special_tokens=not starts_with_bos)["input_ids"]


def encode_completion(tokenizer, completion: str) -> list[int]:
    """A completion's token ids as trained on: its text (no special tokens added) and EOS."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def check_context(model, tokenizer, prompts: list[str], max_new_tokens: int, what: str) -> None:
    """Refuse prompts that leave no room in the model's context (`max_position_embeddings`) for a single new token,
    naming how many and the longest; warn, with the count, where the generation limit would run past it (those rows
    stop at the context's end)."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not context or not prompts:
        return
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    over = sum(n >= context for n in lengths)
    if over:
        raise ValueError(
            f"{what}: {over} of {len(prompts)} prompts are as long as the model's context of {context} tokens or "
            f"longer (the longest: {max(lengths)} tokens), so nothing could be generated for them; shorten them "
            "(fewer eval.shots, shorter arm prompts) or use a model with a longer context"
        )
    tight = sum(n + max_new_tokens > context for n in lengths)
    if tight:
        log.warning(
            "%s: %d of %d prompts leave fewer than %d new tokens in the model's context of %d; they stop at its end",
            what,
            tight,
            len(prompts),
            max_new_tokens,
            context,
        )
