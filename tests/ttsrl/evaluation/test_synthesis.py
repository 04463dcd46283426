"""ttsrl.evaluation.synthesis in this process with a tiny converted policy and the real server
(stand-in engines): test sets as published, prompt speech tokens from the server, the voice
of each utterance and bad prompts. infer_dist.py's parser makes the run's flags."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

import infer_dist
from tests.evaluation_utils import PROMPT_TEXT, TEXTS, check_outputs, voice_of, write_manifests
from tests.policy_utils import tiny_policy  # noqa: F401 (a fixture)
from token2wav_server import standin
from ttsrl.eval_sets import EvalSetError, load_eval_set
from ttsrl.evaluation.prompts import BadPromptError, fill_prompt_tokens
from ttsrl.evaluation.synthesis import run


def read_manifest(path: str):
    return load_eval_set(path).utterances


def test_manifest_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "meta.lst"
    bad.write_text("a|p|w.wav|你好\nb|only|three\n", encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"meta\.lst:2: expected 'utt\|prompt_text\|prompt_wav\|text'.* 3 fields"):
        read_manifest(str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "好"}\n{"id": "a", "text": "行"}\n', encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"dup\.jsonl:2: duplicate utterance id 'a'"):
        read_manifest(str(dup))
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"id": "a", "text": "  "}\n', encoding="utf-8")
    with pytest.raises(EvalSetError, match="has no text"):
        read_manifest(str(empty))


def test_relative_prompt_paths_resolve_as_each_layout_publishes_them(tmp_path):
    manifests = write_manifests(tmp_path / "set")
    utterances = read_manifest(str(manifests["meta.lst"]))
    assert utterances[0].prompt_wav == str((tmp_path / "set" / "prompt-wavs" / "p0.wav").resolve())
    assert utterances[0].where == f"{manifests['meta.lst']}:1"
    assert read_manifest(str(manifests["jsonl"]))[1].prompt_tokens == [1, 2, 3]
    cv3 = read_manifest(str(manifests["cv3-eval"]))
    assert [(u.id, u.text, u.prompt_text) for u in cv3[:2]] == [("utt0", TEXTS[0], PROMPT_TEXT),
                                                                 ("utt1", TEXTS[1], PROMPT_TEXT)]
    assert cv3[2].prompt_wav == str((manifests["cv3-eval"] / "waveform" / "prompt_audio_2.wav").resolve())
    assert cv3[0].where == f"{manifests['cv3-eval'].resolve() / 'text'}:1"
    # a five-field Seed-TTS-eval line (with the ground-truth wav) reads the same
    five = tmp_path / "five.lst"
    five.write_text("u|提示|p.wav|你好|gt/u.wav\n", encoding="utf-8")
    assert read_manifest(str(five))[0].text == "你好"


def test_prompt_tokens_come_from_the_server_speech_tokenizer(tmp_path, tiny_policy, reward_server):
    """A prompt wav of stand-in audio is tokenized by the live server into exactly its ids; the
    utterance is then prompted zero-shot with them. Audio the tokenizer cannot read, and a server
    without the model, leave text-only prompting; manifest tokens win over the wav."""
    from transformers import AutoTokenizer

    from ttsrl.frontend import PolicyFrontend, wav_prompt_token_limit
    from ttsrl.policy.generation import utterance_inputs
    from ttsrl.speech_tokens import format_speech_tokens

    folder = tmp_path / "set"
    folder.mkdir()
    ids = standin.text_to_tokens("一丁七")  # [0, 1, 2]
    soundfile.write(folder / "standin.wav", standin.tokens_to_wave(ids), standin.SAMPLE_RATE, subtype="FLOAT")
    soundfile.write(folder / "noise.wav", np.random.default_rng(0).normal(0, 0.1, 1000).astype(np.float32), 16000)
    records = [{"id": "u0", "text": "你好", "prompt_text": "提示", "prompt_wav": "standin.wav"},
               {"id": "u1", "text": "再见", "prompt_text": "提示", "prompt_wav": "noise.wav"},
               {"id": "u2", "text": "明天", "prompt_wav": "standin.wav", "prompt_tokens": [7, 8]},
               {"id": "u3", "text": "春天"}]
    manifest = folder / "test.jsonl"
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")

    unserved = read_manifest(str(manifest))
    sources = fill_prompt_tokens(unserved, reward_server.grpc_url, model="no_such_model")
    assert sources == {"u0": "none", "u1": "none", "u2": "manifest", "u3": "none"}
    assert unserved[0].prompt_tokens == []

    utterances = read_manifest(str(manifest))
    sources = fill_prompt_tokens(utterances, reward_server.grpc_url)
    assert sources == {"u0": "server", "u1": "none", "u2": "manifest", "u3": "none"}
    assert [u.prompt_tokens for u in utterances] == [ids, [], [7, 8], []]
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    [call] = utterance_inputs(PolicyFrontend(tokenizer, "cosyvoice2"), utterances[0])
    kept = ids[:wav_prompt_token_limit(folder / "standin.wav")]  # trimmed as upstream trims them
    assert kept
    assert tokenizer.decode(list(call.ids)).endswith("提示你好。<|task_id|>" + format_speech_tokens(kept))

    out = tmp_path / "out"
    args = infer_dist.build_parser().parse_args(["--model", str(tiny_policy), "--manifest", str(manifest),
                                                 "--output-dir", str(out), "--server-url", reward_server.grpc_url,
                                                 "--max-new-tokens", "4", "--greedy", "--prompt-voice", "bank"])
    run(args)
    written = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines())}
    assert [(written[u]["zero_shot"], written[u]["prompt_tokens_source"]) for u in ("u0", "u1", "u2", "u3")] == [
        (True, "server"), (False, "none"), (True, "manifest"), (False, "none")]


def run_in_process(policy: Path, manifest: Path, out: Path, server_url: str, *extra: str) -> dict:
    args = infer_dist.build_parser().parse_args(["--model", str(policy), "--manifest", str(manifest), "--output-dir",
                                                 str(out), "--server-url", server_url, "--max-new-tokens", "6",
                                                 "--batch-size", "4", "--seed", "1", *extra])
    return run(args)


def test_bank_voice_only_when_asked(tmp_path, tiny_policy, reward_server):
    manifest = write_manifests(tmp_path / "set")["meta.lst"]
    run_in_process(tiny_policy, manifest, tmp_path / "bank", reward_server.grpc_url, "--prompt-voice", "bank")
    check_outputs(tmp_path / "bank", own_voice=False)


def test_bad_prompts_are_reported_with_file_and_line_then_failed_or_skipped(tmp_path, tiny_policy, reward_server):
    folder = tmp_path / "set"
    write_manifests(folder)
    (folder / "prompt-wavs" / "broken.wav").write_bytes(b"RIFF....not a wav")
    soundfile.write(folder / "prompt-wavs" / "long.wav", np.full(16000 * 31, 0.1, np.float32), 16000, subtype="PCM_16")
    lines = [f"utt0|{PROMPT_TEXT}|prompt-wavs/p0.wav|{TEXTS[0]}",
             f"utt1|{PROMPT_TEXT}|prompt-wavs/missing.wav|{TEXTS[1]}",
             f"utt2|{PROMPT_TEXT}|prompt-wavs/broken.wav|{TEXTS[2]}",
             f"utt3|{PROMPT_TEXT}|prompt-wavs/long.wav|{TEXTS[3]}",
             f"utt4||prompt-wavs/p4.wav|{TEXTS[4]}",
             f"utt5|{PROMPT_TEXT}|prompt-wavs/p5.wav|{TEXTS[5]}"]
    manifest = folder / "bad.lst"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BadPromptError) as failed:
        run_in_process(tiny_policy, manifest, tmp_path / "fail", reward_server.grpc_url)
    message = str(failed.value)
    assert message.startswith("4 utterance(s) have a prompt that cannot condition their audio")
    assert f"bad.lst:2: utterance 'utt1': prompt wav {folder.resolve() / 'prompt-wavs' / 'missing.wav'} not found" in message
    assert "bad.lst:3: utterance 'utt2': cannot read prompt wav" in message
    assert "bad.lst:4: utterance 'utt3': prompt wav" in message and "31.0 s long" in message
    assert "bad.lst:5: utterance 'utt4': no prompt transcript" in message
    assert not (tmp_path / "fail" / "wavs").exists()  # nothing generated

    out = tmp_path / "skip"
    summary = run_in_process(tiny_policy, manifest, out, reward_server.grpc_url, "--on-bad-prompt", "skip")
    assert summary["bad_prompt"] == 4 and summary["ok"] + summary["failed"] == 2
    records = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines())}
    for utt_id in ("utt1", "utt2", "utt3", "utt4"):
        assert records[utt_id]["bad_prompt"] and records[utt_id]["error"].startswith("skipped, bad prompt: ")
        assert not (out / "wavs" / f"{utt_id}.wav").exists()  # nothing decoded in another voice
    listed = (out / "bad_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(": utterance")[0].rsplit(":", 1)[1] for line in listed] == ["2", "3", "4", "5"]
    for utt_id in ("utt0", "utt5"):
        if records[utt_id]["error"] is None:
            wave, _ = soundfile.read(out / "wavs" / f"{utt_id}.wav", dtype="float32")
            assert standin.wave_voice(wave) == voice_of(int(utt_id[3:]))
