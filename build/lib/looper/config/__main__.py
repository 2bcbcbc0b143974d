"""`python -m looper.config > docs/config.md`: the config reference, generated from the schemas."""

from looper.config import reference_markdown

print(reference_markdown(), end="")
