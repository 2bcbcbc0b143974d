"""Hydra config groups. A package so that the wheel ships them as `looper/conf/` (pyproject.toml maps this directory
there); in a checkout `looper.config.conf_dir()` finds them here."""
