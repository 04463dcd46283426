"""Stage 4 (trainer environment): synthesis of a test set with a policy checkpoint, scoring
of its wavs with the published metric and ours, and the per-step summary."""
