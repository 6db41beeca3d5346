"""zeta's benchmark suite: ``python -m bench NAME [--seed S] [--json]``."""
