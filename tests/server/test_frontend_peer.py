"""ttsrl.frontend against the pinned upstream code: for both families, the token ids we build
(and the length bounds) equal what upstream's ``text_normalize`` + ``frontend_zero_shot`` +
``Qwen2LM.inference`` / ``CosyVoice3LM.inference`` feed the LLM, on the real Qwen BPE
vocabulary (tests/qwen_vocab.py) over a corpus of (prompt text, text) pairs with digits, dates,
times, English words and numbers, mixed punctuation and Latin words at the join.

What runs is upstream's own code: ``CosyVoiceFrontEnd`` (its tokenizer class
``get_qwen_tokenizer`` on a CosyVoice-BlankEN-like folder of the real vocabulary, wetext, its
speech tokenizer and CAM++ sessions on ONNX stand-ins with the real input/output names, its
24 kHz mel features) and the LLM classes' ``inference``, which builds ``lm_input`` and the
min/max lengths. Two things are replaced, each for a stated reason: ``load_wav`` reads the wav
with soundfile (torchaudio.load needs torchcodec and FFmpeg, absent here; the resampling is
still torchaudio's ``Resample``), and the LLMs' embeddings are tables that write each id into
the embedding vector with a tag for its table (text, speech, llm_embedding), so ``lm_input``
can be read back as ids; ``inference_wrapper`` (the decoding loop) records
``lm_input``, ``min_len`` and ``max_len`` instead of decoding.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from ttsrl.frontend import PolicyFrontend, TextNormalizer, short_text, trim_prompt_tokens
from ttsrl.model_family import COSYVOICE3_SYSTEM_PREFIX, SPEECH_VOCAB_SIZE, get_family

PROMPT_TEXTS = [
    "希望你以后能够做的比我还好呦。",
    "我最喜欢的编程语言是Python",
    "今天是2024年3月15日，天气很好。",
    "他说：“明天见！”",
    "The meeting starts at 3 pm.",
    "I paid $25.50 for it",
    "我们用了GPT-4和BERT模型",
    "第1章 （引言） 【重要】",
    "嗯……这个问题，我想想",
    "Call me at 555-0123.",
    "温度是-5℃，湿度80%",
    "Dr. Smith arrived at 10:30",
    "你好 world",
    "价格是1,234.56元",
    "",
    "one two three",
]
TEXTS = [
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。",
    "2023年GDP增长了5.2%，达到126万亿元。",
    "Python3.8版本发布于2019年10月14日",
    "他的电话是13800138000，请在下午3:30之前打给他",
    "比分是3:2，主队获胜！！",
    "Hello world, this is a test.",
    "In 2024, the company earned $1.5 million.",
    "It's 7:45 am on March 3rd, 1999",
    "ing is what we do",
    "面积是100m²，体积是3m³",
    "这是第一句。这是第二句！这是第三句？",
    "我们的第一站是北京的故宫博物院，那里收藏了大量珍贵的文物。第二站是长城，我们在八达岭爬了整整三个小时。"
    "第三站是颐和园，湖光山色令人流连忘返。最后我们去了王府井大街，品尝了各种各样的北京小吃，大家都非常开心。",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn. Meanwhile, 25 ducks swim calmly "
    "across the pond while 3 children watch them from the old wooden bridge. Later that day, everyone went home "
    "and talked about the 7 wonders of the world until midnight.",
    "她说：“你好。”然后离开了",
    "（注：以上数据来自2022年统计）",
    "中国 - 北京",
    "人工智能——未来的方向",
    "。。。你好",
    "1/2的人同意",
    "温度-3.5度",
    "我在 Google 工作",
    "OK，没问题",
    "Mr. and Mrs. Smith went to N.Y.C. on 5/6/2021.",
    "ABC",
    "Season 2, Episode 10",
    "第3届世界杯于1938年举行，",
    "第一行\n第二行",
    "她的名字叫 Alice 。",
    "百分之50的概率",
    "world peace",
]
PAIRS = [(PROMPT_TEXTS[i % len(PROMPT_TEXTS)], TEXTS[i % len(TEXTS)]) for i in range(240)]
"""240 distinct pairs (every prompt with every other text): each text 8 times, each prompt 15."""
FAMILIES = ("cosyvoice2", "cosyvoice3")


def test_the_corpus_covers_what_the_issue_asks():
    assert len(PAIRS) >= 200
    joins = [(p, t) for p, t in PAIRS if p[-1:].isascii() and p[-1:].isalpha() and t[:1].isascii() and t[:1].isalpha()]
    assert len(joins) >= 10  # Latin words on both sides of the join
    assert any(ch.isdigit() for _, t in PAIRS for ch in t)


# ------------------------------------------------------------------ upstream, instrumented

def _read_wav_with_soundfile(wav, target_sr, min_sr=16000):
    """Upstream's load_wav (channels averaged, torchaudio's Resample) reading with soundfile."""
    import soundfile
    import torch
    import torchaudio

    data, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
    speech = torch.from_numpy(np.ascontiguousarray(data.T)).mean(dim=0, keepdim=True)
    if rate != target_sr:
        assert rate >= min_sr
        speech = torchaudio.transforms.Resample(orig_freq=rate, new_freq=target_sr)(speech)
    return speech


class _IdTables:
    """Embeddings whose row i is (i, table tag, 0): lm_input rows read back as (tag, id)."""

    TEXT, SPEECH, LLM_EMBEDDING = 0, 1, 2

    @staticmethod
    def table(rows: int, tag: int):
        import torch

        weight = torch.zeros(rows, 3)
        weight[:, 0] = torch.arange(rows, dtype=torch.float32)
        weight[:, 1] = tag
        return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def _upstream_llm(family: str, text_vocab: int):
    import torch
    from cosyvoice.llm.llm import CosyVoice3LM, Qwen2LM

    inner, middle, outer = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
    inner.embed_tokens = _IdTables.table(text_vocab, _IdTables.TEXT)
    middle.model = inner
    outer.model = middle
    cls = Qwen2LM if family == "cosyvoice2" else CosyVoice3LM
    llm = cls(llm_input_size=3, llm_output_size=3, speech_token_size=SPEECH_VOCAB_SIZE, llm=outer, sampling=None)
    llm.speech_embedding = _IdTables.table(llm.speech_embedding.num_embeddings, _IdTables.SPEECH)
    if hasattr(llm, "llm_embedding"):
        llm.llm_embedding = _IdTables.table(2, _IdTables.LLM_EMBEDDING)
    seen = {}

    def record(lm_input, sampling, min_len, max_len, uuid):
        seen.update(lm_input=lm_input[0].clone(), min_len=int(min_len), max_len=int(max_len))
        yield from ()

    llm.inference_wrapper = record
    return llm, seen


def _as_policy_ids(lm_input, family: str, tokenizer) -> list[int]:
    """Upstream's lm_input rows as the Hugging Face policy's token ids."""
    family = get_family(family)
    speech_offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
    ids = []
    for value, tag, _ in lm_input.tolist():
        row = int(round(value))
        if tag == _IdTables.TEXT:
            ids.append(row)
        elif tag == _IdTables.SPEECH and row < SPEECH_VOCAB_SIZE:
            ids.append(speech_offset + row)
        elif tag == _IdTables.SPEECH:
            ids.append(tokenizer.convert_tokens_to_ids(family.extra_row_tokens[row - SPEECH_VOCAB_SIZE]))
        else:
            ids.append(tokenizer.convert_tokens_to_ids(family.llm_embedding_tokens[row]))
    return ids


def _memoize_wav_features(frontend) -> None:
    """Upstream's three per-wav extractions, each computed once per wav by upstream's own code
    (the corpus reuses three prompt wavs; recomputing them 480 times only costs time). Copies
    are handed out because frontend_zero_shot writes into the length tensors."""
    for name in ("_extract_speech_feat", "_extract_speech_token", "_extract_spk_embedding"):
        real = getattr(frontend, name)
        cache = {}

        def memoized(wav, real=real, cache=cache):
            if wav not in cache:
                cache[wav] = real(wav)
            value = cache[wav]
            return tuple(v.clone() for v in value) if isinstance(value, tuple) else value.clone()

        setattr(frontend, name, memoized)


@pytest.fixture(scope="module")
def upstream(cosyvoice_src, tmp_path_factory):
    """Per family: (upstream CosyVoiceFrontEnd, instrumented LLM, what it recorded, our policy tokenizer)."""
    import cosyvoice.cli.frontend as upstream_frontend
    from cosyvoice.cli.frontend import CosyVoiceFrontEnd
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer
    from matcha.utils.audio import mel_spectrogram

    from tests.qwen_vocab import blank_en_dir, policy_tokenizer
    from ttsrl.tiny_models.cosyvoice2 import write_campplus_onnx, write_speech_tokenizer_onnx

    folder = tmp_path_factory.mktemp("frontend_peer")
    campplus = write_campplus_onnx(folder / "campplus.onnx")
    speech_tokenizer = write_speech_tokenizer_onnx(folder / "speech_tokenizer.onnx")
    feat_extractor = functools.partial(mel_spectrogram, n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480,
                                       win_size=1920, fmin=0, fmax=8000, center=False)
    saved = upstream_frontend.load_wav
    upstream_frontend.load_wav = _read_wav_with_soundfile
    try:
        built = {}
        for family in FAMILIES:
            get_tokenizer = functools.partial(get_qwen_tokenizer, token_path=str(blank_en_dir()),
                                              skip_special_tokens=True, version=family)
            frontend = CosyVoiceFrontEnd(get_tokenizer, feat_extractor, str(campplus), str(speech_tokenizer), "",
                                         "all")
            _memoize_wav_features(frontend)
            assert frontend.text_frontend == "wetext"  # no ttsfrd here: upstream picks wetext, as ours must
            ours = policy_tokenizer(family)
            llm, seen = _upstream_llm(family, len(ours))
            built[family] = (frontend, llm, seen, ours)
        yield built
    finally:
        upstream_frontend.load_wav = saved


@pytest.fixture(scope="module")
def prompt_wavs(cosyvoice_src, tmp_path_factory):
    """The upstream prompt (24 kHz) and two resamplings of it at other rates and odd lengths."""
    import soundfile
    import soxr

    source = cosyvoice_src / "asset" / "zero_shot_prompt.wav"
    wave, rate = soundfile.read(str(source), dtype="float32")
    folder = tmp_path_factory.mktemp("peer_prompts")
    wavs = [source]
    for new_rate, cut in ((16000, 123), (44100, 77)):
        path = folder / f"prompt_{new_rate}.wav"
        soundfile.write(str(path), soxr.resample(wave, rate, new_rate)[:-cut], new_rate)
        wavs.append(path)
    return wavs


def _upstream_calls(frontend, llm, seen, family, text, prompt_text, wav, tokenizer):
    """What inference_zero_shot feeds the LLM: [(ids, min_len, max_len, short-text warning)]."""
    import torch

    prompt_argument = COSYVOICE3_SYSTEM_PREFIX + prompt_text if family == "cosyvoice3" else prompt_text
    prompt = frontend.text_normalize(prompt_argument, split=False, text_frontend=True)
    calls = []
    for segment in frontend.text_normalize(text, split=True, text_frontend=True):
        model_input = frontend.frontend_zero_shot(segment, prompt, str(wav), 24000, "")
        list(llm.inference(text=model_input["text"], text_len=torch.tensor([model_input["text"].shape[1]]),
                           prompt_text=model_input["prompt_text"],
                           prompt_text_len=torch.tensor([model_input["prompt_text"].shape[1]]),
                           prompt_speech_token=model_input["llm_prompt_speech_token"],
                           prompt_speech_token_len=torch.tensor([model_input["llm_prompt_speech_token"].shape[1]]),
                           embedding=model_input["llm_embedding"]))
        calls.append((_as_policy_ids(seen["lm_input"], family, tokenizer), seen["min_len"], seen["max_len"],
                      len(segment) < 0.5 * len(prompt)))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_input_equals_what_upstream_feeds_the_llm(family, upstream, prompt_wavs):
    import soundfile

    frontend, llm, seen, tokenizer = upstream[family]
    ours = PolicyFrontend(tokenizer, family, normalizer=TextNormalizer("wetext"))
    raw_tokens = {}
    for wav in prompt_wavs:
        tokens, _ = frontend._extract_speech_token(str(wav))  # the tokenizer call upstream makes, untrimmed
        info = soundfile.info(str(wav))
        raw_tokens[wav] = (tokens[0].tolist(), trim_prompt_tokens(tokens[0].tolist(), info.frames, info.samplerate))
    assert any(len(trimmed) < len(raw) for raw, trimmed in raw_tokens.values())  # trimming is exercised
    calls = segments = 0
    for k, (prompt_text, text) in enumerate(PAIRS):
        wav = prompt_wavs[k % len(prompt_wavs)]
        expected = _upstream_calls(frontend, llm, seen, family, text, prompt_text, wav, tokenizer)
        got = ours.inputs(text, prompt_text, raw_tokens[wav][1])
        where = f"pair {k}: prompt {prompt_text!r}, text {text!r}, wav {wav.name}"
        assert len(got) == len(expected), where
        for mine, (ids, min_len, max_len, warned) in zip(got, expected):
            assert list(mine.ids) == ids, where
            assert (mine.min_tokens, mine.max_tokens) == (min_len, max_len), where
            assert short_text(mine.text, mine.prompt_text) == warned, where
        calls += 1
        segments += len(got)
    assert calls == len(PAIRS) and segments > calls  # the long texts were split as upstream splits them


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_input_equals_upstreams_prompt_free_call(family, upstream, prompt_wavs):
    """Rows without a speaker prompt: CosyVoice2's cross-lingual input (no prompt text, no prompt
    speech), CosyVoice3's instruct2 input with the bare system prompt."""
    import torch

    frontend, llm, seen, tokenizer = upstream[family]
    ours = PolicyFrontend(tokenizer, family, normalizer=TextNormalizer("wetext"))
    empty = torch.zeros(1, 0, dtype=torch.int32)
    for text in TEXTS:
        got = ours.inputs(text)
        expected = []
        for segment in frontend.text_normalize(text, split=True, text_frontend=True):
            if family == "cosyvoice2":
                model_input = frontend.frontend_cross_lingual(segment, str(prompt_wavs[0]), 24000, "")
                prompt = empty
            else:
                model_input = frontend.frontend_instruct2(segment, COSYVOICE3_SYSTEM_PREFIX, str(prompt_wavs[0]),
                                                          24000, "")
                prompt = model_input["prompt_text"]
            list(llm.inference(text=model_input["text"], text_len=torch.tensor([model_input["text"].shape[1]]),
                               prompt_text=prompt, prompt_text_len=torch.tensor([prompt.shape[1]]),
                               prompt_speech_token=empty, prompt_speech_token_len=torch.tensor([0]),
                               embedding=model_input["flow_embedding"]))
            expected.append((_as_policy_ids(seen["lm_input"], family, tokenizer), seen["min_len"], seen["max_len"]))
        assert [(list(i.ids), i.min_tokens, i.max_tokens) for i in got] == expected, text
