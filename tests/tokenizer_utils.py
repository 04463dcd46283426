"""A tiny byte-level BPE tokenizer built in-process, carrying our chat templates."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ttsrl.chat_template import SPEECH_GENERATION_START, TEMPLATES
from ttsrl.speech_tokens import SOS_TOKEN, TASK_ID_TOKEN

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", SOS_TOKEN, TASK_ID_TOKEN, SPEECH_GENERATION_START]
CORPUS = ["你好世界，今天天气很好。", "我们在二零二四年去了北京。", "hello world, TTS 2024年3月5日"]


def tiny_tokenizer(style: str = "cosyvoice2") -> PreTrainedTokenizerFast:
    """Byte-level BPE (decodes any text exactly) with the chat template of ``style``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])
    wrapped.chat_template = TEMPLATES[style]
    return wrapped
