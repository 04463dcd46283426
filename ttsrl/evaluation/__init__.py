"""Stages 4 and 5 (trainer environment): synthesis of a test set with a policy checkpoint
(``synthesis``, with ``prompts``, ``decoders`` and the output folder's files in ``outputs``),
scoring of its wavs with the published metric and ours (``wer``, ``output_scoring``), the
per-step summary (``summary``), and stage 5's one-text synthesis."""
