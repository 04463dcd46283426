"""The recipe's library. Entry points (``prepare_data.py``, ``infer_dist.py``, ``reward_tts.py``,
``scripts/*.py``) are thin CLIs over it; ``token2wav_server`` and ``verl_plugins`` build on it.

The top-level modules are the shared core: both environments (the veRL trainer env and
the Triton reward-server env) import them, so they need only light packages (numpy,
pypinyin, wetext, jiwer/rapidfuzz, PyYAML, tritonclient). One module per concept:

- ``speech_tokens``: the ``<|s_N|>`` speech-token format and its special tokens.
- ``chat_template``: the prompt templates the policy is trained with.
- ``sampling``: temperature, top-p and top-k of the recipe (read from configs/grpo.yaml).
- ``text_norm``: text normalization and the alternative readings of numbers.
- ``scoring``: pinyin / character error rates (the reward's); ``protocol_scoring``: the
  published Seed-TTS-eval CER/WER.
- ``reward_shaping``: error rate -> reward utilities and their combination.
- ``eval_sets``: zero-shot test sets as published (Seed-TTS-eval, CV3-Eval, JSONL).
- ``atomic_write``: write a file or directory whole or not at all.
- ``cosyvoice_source``: find or unpack the pinned CosyVoice source.
- ``triton_client``: the one client of the reward server (sync, async, readiness).
- ``tiny_models``: tiny random models in the real layouts (tests, the smoke profile).

Subpackages that need the trainer environment (torch, transformers, veRL, pyarrow):

- ``policy``: the LLM in Hugging Face form: conversion, export, warm-up, generation.
- ``training``: stage 0 data, stage 2 preflight, stage 3 merge.
- ``evaluation``: stages 4-5: test-set synthesis, scoring of its wavs, the summary.

docs/architecture.md maps each stage to its modules and processes.
"""
