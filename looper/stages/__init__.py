"""The stages: each module builds one kind of artifact and declares what it needs and reads (looper/pipeline.py).

`base` (the base model), `sft`, `rollout`, `preferences`, `dpo`, `export` and `evaluation` (one target on one
dataset, and the run's comparison). A stage imports services (looper/*.py) and the engine (`looper.engine`), never
another stage or the pipeline.
"""
