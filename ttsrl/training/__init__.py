"""Training-side stages (trainer environment): stage 0 data, stage 2's preflight, stage 3's
merge of veRL checkpoints."""
