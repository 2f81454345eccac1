"""Training the two learned parts of DEL with the LLM frozen: the projection and the soft prompts.

`data` turns text into fixed-length segments, `mechanism` is the quantizer as torch ops, `loop` is the
shared optimisation loop (checkpoints, resume, progress, cancellation), and `projection` / `soft_prompt`
each hold one method's config and loss side by side. `jobs` runs them in the background for the admin API.
"""
