"""``romcomp probe``: linear probes on frozen hidden states, with control tasks (selectivity)."""
