"""Shared pure-Python code of the CosyVoice2 GRPO recipe.

Both environments import this package (the veRL trainer env and the Triton
reward-server env), so it depends only on light pure-Python/C-extension
packages: pypinyin, wetext, rapidfuzz (via jiwer). One module per concept:

- ``speech_tokens``: the ``<|s_N|>`` speech-token format and its special tokens.
- ``chat_template``: the prompt templates the policy is trained with.
- ``text_norm``: text normalization and the alternative readings of numbers.
- ``scoring``: pinyin / character error rates.
- ``reward``: error rate -> reward utilities and their combination.
"""
