"""The policy LLM in Hugging Face form (torch + transformers; trainer environment):
conversion of CosyVoice2's ``llm.pt`` to a Qwen2 checkpoint (``hf_conversion``) and back
(``llm_export``), what the conversion changes (``conversion_bias``), the supervised warm-up
(``sft_warmup``) and speech-token generation (``generation``). The tiny random models are
in ``ttsrl.tiny_models``."""
