"""Stand-in engines: deterministic token -> audio -> text."""
import numpy as np
import pytest

from token2wav_server import standin
from token2wav_server.engines import EngineOptions, Engines, SpeakerPrompt


def test_text_to_tokens_round_trips_through_audio_and_asr():
    engines = standin.create_engines(EngineOptions())
    assert isinstance(engines, Engines)
    texts = ["一丁七万", "三", "丈上下三"]
    ids = [np.array(standin.text_to_tokens(t)) for t in texts]
    waves = engines.token2wav.synthesize(ids, [None] * len(ids))
    assert [w.dtype for w in waves] == [np.float32] * 3
    assert [w.size for w in waves] == [standin.SAMPLES_PER_TOKEN * len(t) for t in texts]
    results = engines.asr.transcribe(waves)
    assert [r.text for r in results] == texts
    assert [r.nll for r in results] == [0.0, 0.0, 0.0]


def test_every_token_id_survives_the_round_trip():
    ids = np.arange(standin.SPEECH_VOCAB_SIZE)
    assert np.array_equal(standin.wave_to_tokens(standin.tokens_to_wave(ids)), ids)
    assert standin.tokens_to_text(ids) == standin.TABLE
    assert standin.text_to_tokens(standin.TABLE[:10]) == list(range(10))


def test_characters_outside_the_table_are_refused_with_their_position():
    with pytest.raises(ValueError, match=r"'A' at position 1"):
        standin.text_to_tokens("一A")


@pytest.mark.parametrize("wave", [
    np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32),   # real-looking audio
    standin.tokens_to_wave([3, 4])[:-1],                                  # truncated stand-in audio
    np.zeros(standin.SAMPLES_PER_TOKEN, dtype=np.float32),                # silence (code 0 is not a token)
    np.full(standin.SAMPLES_PER_TOKEN, 0.9, dtype=np.float32),            # constant but not k/8192
    np.zeros(0, dtype=np.float32),
])
def test_non_standin_audio_transcribes_to_the_documented_string(wave):
    result = standin.StandinAsr().transcribe([wave])[0]
    assert (result.text, result.nll) == (standin.UNKNOWN_AUDIO_TEXT, standin.UNKNOWN_AUDIO_NLL)


def test_speaker_embedding_is_deterministic_and_normalized():
    speaker = standin.StandinSpeaker()
    a = standin.tokens_to_wave([1, 2, 3])
    b = np.random.default_rng(0).normal(0, 0.3, 3000).astype(np.float32)
    emb = speaker.embed([a, a, b])
    assert emb.shape == (3, 4)
    assert np.array_equal(emb[0], emb[1])
    assert np.linalg.norm(emb[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(emb[0] @ emb[2]) < 0.999


def test_delay_option_and_prompt_bookkeeping():
    engines = standin.create_engines(EngineOptions(extra={"delay_ms": "1"}))
    assert engines.token2wav.delay_ms == 1.0
    prompt = SpeakerPrompt("p", np.zeros(10, dtype=np.float32), 16000, "text")
    prepared = engines.token2wav.prepare_prompt(prompt)
    assert prepared == standin.StandinPrompt("p", 0)  # silence: the neutral voice
    assert engines.token2wav.prepared_prompts == 1
    engines.token2wav.synthesize([np.array([1])], [prepared])
    assert engines.token2wav.last_prompts == [prepared]


def test_tokens_per_char_reads_runs_of_tokens_as_one_character():
    engines = standin.create_engines(EngineOptions(extra={"tokens_per_char": "5"}))
    ids = standin.text_to_tokens("一丁七", 5)
    assert ids == [0] * 5 + [1] * 5 + [3] * 5
    wave = engines.token2wav.synthesize([np.array(ids)], [None])[0]
    assert engines.asr.transcribe([wave])[0].text == "一丁七"
    ids[7] = 2  # a wrong token inside a run does not change the run's character
    assert standin.tokens_to_text(ids, 5) == "一丁七"
    with pytest.raises(ValueError):
        standin.StandinAsr(tokens_per_char=0)


def test_voices_change_the_audio_and_its_speaker_embedding_but_not_the_text():
    ids = standin.text_to_tokens("一丁七万")
    waves = [standin.tokens_to_wave(ids, voice) for voice in range(standin.VOICES)]
    assert np.array_equal(waves[0], standin.tokens_to_wave(ids))  # voice 0 is the plain audio
    assert [standin.wave_voice(w) for w in waves] == list(range(standin.VOICES))
    assert all(standin.wave_to_tokens(w).tolist() == ids for w in waves)
    assert {r.text for r in standin.StandinAsr().transcribe(waves)} == {"一丁七万"}
    embeddings = standin.StandinSpeaker().embed(waves)
    assert len({tuple(np.round(e, 6)) for e in embeddings}) == standin.VOICES
    assert standin.wave_voice(waves[3][:-1]) is None
    with pytest.raises(ValueError, match="voice"):
        standin.tokens_to_wave(ids, standin.VOICES)


def test_a_prompt_conditions_its_own_voice():
    token2wav = standin.StandinToken2Wav()
    prompts = [SpeakerPrompt("a", standin.tokens_to_wave([5, 6], voice=7), 16000, "甲"),
               SpeakerPrompt("b", np.zeros(800, dtype=np.float32), 16000, "乙"),
               SpeakerPrompt("c", np.random.default_rng(1).normal(0, 0.1, 1600).astype(np.float32), 16000, "丙")]
    prepared = [token2wav.prepare_prompt(p) for p in prompts]
    assert [p.voice for p in prepared[:2]] == [7, 0]
    assert 1 <= prepared[2].voice < standin.VOICES
    assert prepared[2] == token2wav.prepare_prompt(prompts[2])  # deterministic
    waves = token2wav.synthesize([np.array([1, 2])] * 3, prepared)
    assert [standin.wave_voice(w) for w in waves] == [p.voice for p in prepared]


# ---- voice tokens (engine option voice_tokens=true) -------------------------------------
def _voice_engines():
    return standin.create_engines(EngineOptions(extra={"voice_tokens": "true"}))


def test_voice_tokens_are_the_last_sixteen_ids():
    assert standin.VOICE_TOKEN_BASE == standin.SPEECH_VOCAB_SIZE - standin.VOICES == 6545
    assert [standin.is_voice_token(t) for t in (6544, 6545, 6560)] == [False, True, True]
    content, voice = standin.split_voice([6545 + 3, 1, 2, 6545 + 9, 3])
    assert content.tolist() == [1, 2, 3] and voice == 9  # the LAST voice token's voice
    assert standin.split_voice([4, 5])[1] == 0  # none: voice 0


def test_with_voice_tokens_the_tokens_choose_the_voice_not_the_prompt():
    engines = _voice_engines()
    ids = standin.text_to_tokens("一丁七")
    prompt = engines.token2wav.prepare_prompt(SpeakerPrompt("p", standin.tokens_to_wave([5], voice=7), 16000, "甲"))
    waves = engines.token2wav.synthesize(
        [np.array([standin.VOICE_TOKEN_BASE + 2] + ids), np.array(ids), np.array([standin.VOICE_TOKEN_BASE + 4])],
        [prompt] * 3)
    assert [standin.wave_voice(w) for w in waves[:2]] == [2, 0]  # voice token 2; none -> 0; the prompt's 7 unused
    assert waves[2].size == 0  # voice tokens make no audio
    assert [r.text for r in engines.asr.transcribe(waves[:2])] == ["一丁七", "一丁七"]  # the ASR reads the content
    # default (voice_tokens=false): unchanged, the prompt's voice, and id 6547 is a sound
    plain = standin.create_engines(EngineOptions())
    wave = plain.token2wav.synthesize([np.array([standin.VOICE_TOKEN_BASE + 2] + ids)], [prompt])[0]
    assert standin.wave_voice(wave) == 7 and standin.wave_to_tokens(wave)[0] == standin.VOICE_TOKEN_BASE + 2
    with pytest.raises(ValueError, match="voice_tokens='maybe'"):
        standin.create_engines(EngineOptions(extra={"voice_tokens": "maybe"}))


def test_with_voice_tokens_the_speech_tokenizer_names_the_voice_and_targets_copy_it():
    engines = _voice_engines()
    prompt_wave = standin.tokens_to_wave(standin.text_to_tokens("三上"), voice=5)
    prompt_tokens = engines.speech_tokenizer.tokenize([prompt_wave])[0]
    assert prompt_tokens.tolist() == [standin.VOICE_TOKEN_BASE + 5] + standin.text_to_tokens("三上")
    assert standin.StandinSpeechTokenizer().tokenize([prompt_wave])[0].tolist() == standin.text_to_tokens("三上")
    target = standin.targets_for("一丁", prompt_tokens)
    assert target == [standin.VOICE_TOKEN_BASE + 5] + standin.text_to_tokens("一丁")
    assert standin.targets_for("一丁", [standin.VOICE_TOKEN_BASE + 1, 3, standin.VOICE_TOKEN_BASE + 6, 4],
                               tokens_per_char=2) == [standin.VOICE_TOKEN_BASE + 6, 0, 0, 1, 1]
    assert standin.targets_for("一", ()) == [0]  # a prompt without a voice token: content only
    # a perfect policy's audio is the text in the prompt's voice
    wave = engines.token2wav.synthesize([np.array(target)], [None])[0]
    assert engines.asr.transcribe([wave])[0].text == "一丁" and standin.wave_voice(wave) == 5
    with pytest.raises(ValueError, match="is a voice token"):
        standin.targets_for(standin.TABLE[standin.VOICE_TOKEN_BASE], prompt_tokens)


def test_with_voice_tokens_the_speaker_embedding_is_one_hot_of_the_voice():
    speaker = _voice_engines().speaker
    ids = standin.text_to_tokens("一丁")
    waves = [standin.tokens_to_wave(ids, 3), standin.tokens_to_wave([9, 9, 9], 3), standin.tokens_to_wave(ids, 4),
             np.random.default_rng(0).normal(0, 0.1, 1600).astype(np.float32), np.zeros(0, dtype=np.float32)]
    emb = speaker.embed(waves)
    assert emb.shape == (5, standin.VOICES + 1)
    cos = emb @ emb.T  # rows are unit vectors
    assert cos[0, 1] == 1.0 and cos[0, 2] == 0.0  # same voice, other words: 1; other voice: 0
    assert cos[3, 4] == 1.0 and cos[0, 3] == 0.0  # not stand-in audio: the one "unknown" direction
    assert emb[3, standin.VOICES] == 1.0


def test_with_voice_tokens_a_prompt_may_end_in_silence():
    # the smoke prompts: a few characters in a voice, then silence up to the 1 s a prompt needs
    engines = _voice_engines()
    speech = standin.tokens_to_wave(standin.text_to_tokens("上下"), voice=9)
    prompt = np.concatenate([speech, np.zeros(standin.SAMPLE_RATE - speech.size, dtype=np.float32)])
    assert engines.speech_tokenizer.tokenize([prompt])[0].tolist() == \
        [standin.VOICE_TOKEN_BASE + 9] + standin.text_to_tokens("上下")
    emb = engines.speaker.embed([prompt, speech])
    assert float(emb[0] @ emb[1]) == 1.0 and emb[0, 9] == 1.0
    # without voice tokens trailing silence is not stand-in audio, as before
    with pytest.raises(ValueError, match="not stand-in audio"):
        standin.StandinSpeechTokenizer().tokenize([prompt])
    with pytest.raises(ValueError, match="not stand-in audio"):  # silence alone has no voice
        engines.speech_tokenizer.tokenize([np.zeros(standin.SAMPLE_RATE, dtype=np.float32)])
