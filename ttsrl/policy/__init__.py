"""The policy LLM in Hugging Face form (torch + transformers; the trainer environment, and the
server environment for the tiny-model builders): conversion to and from CosyVoice2's
``llm.pt``, the tiny random models tests and the smoke profile build, the supervised
warm-up, and speech-token generation backends."""
