"""cache-inspect: list, show, verify, prune and summarise ep_jit's kernel cache."""
