"""Training-side stages (trainer environment): stage 0 data (``data``), stage 2's preflight
(``preflight``), stage 3's merge of veRL checkpoints (``checkpoints``)."""
