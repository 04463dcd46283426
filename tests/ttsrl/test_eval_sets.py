"""Test sets in their published layouts: Seed-TTS-eval meta.lst, CV3-Eval folders, JSONL."""
import json

import pytest

from ttsrl.eval_sets import EvalSetError, detect_language, detect_layout, load_eval_set


def test_seed_tts_meta_lst_zh_and_en(tmp_path):
    (tmp_path / "zh").mkdir()
    (tmp_path / "en").mkdir()
    (tmp_path / "zh" / "meta.lst").write_text("10002287-00000094|在此奉劝大家别乱打美白针。|prompt-wavs/10002287-00000094.wav|"
                                               "简单地说，这相当于惠普把消费领域市场拱手相让了。\n", encoding="utf-8")
    (tmp_path / "en" / "meta.lst").write_text("common_voice_en_1|This is a prompt.|prompt-wavs/p1.wav|"
                                               "Read this sentence aloud.|wavs/gt1.wav\n", encoding="utf-8")
    zh = load_eval_set(str(tmp_path / "zh" / "meta.lst"))
    en = load_eval_set(str(tmp_path / "en" / "meta.lst"))
    assert (zh.layout, zh.language, en.layout, en.language) == ("seed-tts", "zh", "seed-tts", "en")
    assert zh.utterances[0].prompt_wav == str((tmp_path / "zh" / "prompt-wavs" / "10002287-00000094.wav").resolve())
    assert en.utterances[0].text == "Read this sentence aloud." and en.utterances[0].prompt_text == "This is a prompt."


def test_cv3_eval_folder_as_published(tmp_path):
    task = tmp_path / "CV3-Eval" / "data" / "zero_shot" / "zh"
    (task / "waveform").mkdir(parents=True)
    (task / "waveform" / "prompt_audio_1.wav").write_bytes(b"")
    (task / "text").write_text("uttid_1 你好世界\nuttid_2 再见\n", encoding="utf-8")
    (task / "prompt_text").write_text("uttid_1 至今为止。\nuttid_2 没有再回来\n", encoding="utf-8")
    (task / "prompt_wav.scp").write_text("uttid_1 data/zero_shot//zh/waveform/prompt_audio_1.wav\n"
                                         "uttid_2 /abs/prompt_audio_2.wav\n", encoding="utf-8")
    assert detect_layout(str(task)) == "cv3-eval"
    loaded = load_eval_set(str(task))
    first, second = loaded.utterances
    assert (first.id, first.text, first.prompt_text) == ("uttid_1", "你好世界", "至今为止。")
    assert first.prompt_wav == str((task / "waveform" / "prompt_audio_1.wav").resolve())  # via the checkout root
    assert second.prompt_wav == "/abs/prompt_audio_2.wav" and loaded.language == "zh"
    (task / "prompt_wav.scp").write_text("uttid_1 a.wav\n", encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"text:2: utterance 'uttid_2' has no line in .*prompt_wav.scp"):
        load_eval_set(str(task))
    (task / "prompt_text").unlink()
    with pytest.raises(EvalSetError, match="missing prompt_text"):
        load_eval_set(str(task))


def test_jsonl_and_errors_name_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "hi", "prompt_tokens": [1, "x"]}) + "\n", encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"set\.jsonl:1: prompt_tokens must be a list of integers"):
        load_eval_set(str(path))
    path.write_text('{"id": "a", "text": "好"}\n\n{"id": "a", "text": "行"}\n', encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"set\.jsonl:3: duplicate utterance id 'a' \(first at .*set\.jsonl:1\)"):
        load_eval_set(str(path))
    with pytest.raises(EvalSetError, match="no such file"):
        load_eval_set(str(tmp_path / "none.lst"))
    with pytest.raises(EvalSetError, match="not a CV3-Eval task folder"):
        load_eval_set(str(tmp_path))


def test_language_detection():
    assert detect_language(["你好 world"]) == "zh"
    assert detect_language(["Hello world 世界 again"]) == "en"


def _cv3_task(root, task, subset, text):
    folder = root / "data" / task / subset
    folder.mkdir(parents=True)
    (folder / "text").write_text(f"u1 {text}\n", encoding="utf-8")
    (folder / "prompt_text").write_text("u1 prompt\n", encoding="utf-8")
    (folder / "prompt_wav.scp").write_text("u1 /abs/p.wav\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("task,subset,language", [
    ("zero_shot", "zh", "zh"), ("zero_shot", "en", "en"), ("zero_shot", "ja", "ja"), ("zero_shot", "ko", "ko"),
    ("zero_shot", "hard_zh", "zh"), ("zero_shot", "hard_en", "en"), ("cross_lingual_zeroshot", "to_ja", "ja"),
    ("cross_lingual_zeroshot", "to_hard_en", "en"), ("zero_shot", "de", ""), ("zero_shot", "ru", ""),
])
def test_cv3_eval_subsets_give_each_utterance_its_language(tmp_path, task, subset, language):
    folder = _cv3_task(tmp_path, task, subset, "Guten Tag" if subset == "de" else "x")
    assert load_eval_set(str(folder)).utterances[0].language == language


def test_declared_languages_and_detection_per_utterance(tmp_path):
    from ttsrl.eval_sets import utterance_languages

    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "meta.lst").write_text("a|p|p.wav|Hello there\n", encoding="utf-8")
    assert load_eval_set(str(tmp_path / "en" / "meta.lst")).utterances[0].language == "en"
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"id": "a", "text": "你好", "language": "cmn"}, {"id": "b", "text": "안녕하세요"}, {"id": "c", "text": "こんにちは"}]),
        encoding="utf-8")
    loaded = load_eval_set(str(path))
    assert [u.language for u in loaded.utterances] == ["zh", "", ""]
    assert utterance_languages(loaded.utterances) == {"a": "zh", "b": "ko", "c": "ja"}
    path.write_text('{"id": "a", "text": "好"}\n{"id": "b", "text": "行", "language": "xx"}\n', encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"set\.jsonl:2: field \"language\": unknown language 'xx'"):
        load_eval_set(str(path))
