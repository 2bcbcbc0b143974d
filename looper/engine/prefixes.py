"""Which prompts begin alike: the shared first tokens the scheduler computes once (an arm's system prompt, few-shot
examples, a trajectory cut at several points). Owns only the comparison of token lists; the scheduler decides what
to share.
"""


def common_prefix(a: list, b: list) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def shared_prefixes(prompts: list[list[int]], minimum: int) -> list[tuple[int, int, int]]:
    """Runs of neighbouring prompts (the queue is in token order, so prompts that begin alike are neighbours) that
    begin with the same `minimum` or more tokens, as (first, end, length): prompts[first:end] share their first
    `length` tokens, and each keeps at least one token of its own. A run grows while that saves more tokens
    ((members - 1) * length): an arm's system prompt, few-shot examples, a trajectory cut at several points."""
    groups, first = [], 0
    while first < len(prompts):
        end, length = first + 1, len(prompts[first]) - 1
        while end < len(prompts):
            common = min(length, common_prefix(prompts[first], prompts[end]), len(prompts[end]) - 1)
            if common < minimum or (end - first) * common < (end - first - 1) * length:
                break
            end, length = end + 1, common
        if end - first > 1:
            groups.append((first, end, length))
        first = end
    return groups
