"""compute_wer.sh / wav mode against the real server (stand-in ASR), and stage 5's synthesize.py."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import soundfile

from tests.cli import load_script
from tests.policy_utils import tiny_policy  # noqa: F401 (a fixture)
from token2wav_server import standin

REPO = Path(__file__).resolve().parents[2]
compute_wer = load_script("compute_wer")


def write_output_dir(out: Path, references: dict[str, str], spoken: dict[str, str],
                     errors: dict[str, str] | None = None, languages: dict[str, str] | None = None) -> None:
    """An infer_dist-shaped folder whose stand-in wavs say ``spoken`` (ids missing from it get no
    wav; ``errors``: their records' synthesis error; ``languages``: each record's declared
    language, none written without it, as a manifest from before languages existed)."""
    (out / "wavs").mkdir(parents=True)
    lines = []
    for utt_id, text in references.items():
        error = (errors or {}).get(utt_id)
        record = {"id": utt_id, "text": text, "error": error}
        if languages is not None:
            record["language"] = languages.get(utt_id, "")
        lines.append(json.dumps(record, ensure_ascii=False))
        if utt_id in spoken:
            wave = standin.tokens_to_wave(standin.text_to_tokens(spoken[utt_id]))
            soundfile.write(out / "wavs" / f"{utt_id}.wav", wave, standin.SAMPLE_RATE, subtype="FLOAT")
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_cer_of_known_transcripts_and_missing_wavs(tmp_path, reward_server):
    references = {"a": "你们好", "b": "今天去公园", "c": "北京", "d": "中国", "e": "上海"}
    spoken = {"a": "你们好", "b": "今天去公", "c": "南京"}  # d, e: no wav
    out = tmp_path / "step_0"
    write_output_dir(out, references, spoken, errors={"e": "no speech tokens generated"})
    env = dict(os.environ, REWARD_SERVER_URL=f"{reward_server.grpc_url},http://127.0.0.1:1")
    done = subprocess.run(["bash", str(REPO / "scripts" / "compute_wer.sh"), str(out), "test_set"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # a: 0/3, b: 1 deletion/5, c: 1 substitution/2 => 2/10 errors; d and e have no wav, so they
    # are left out of the mean as Seed-TTS-eval's run_wer.py leaves them out, and counted on their
    # own: the protocol's figure is (0 + 0.2 + 0.5) / 3 = 23.33% (54.00% if counted as deleted).
    expected = ("%CER 23.33 [ 2 / 10, 0 ins, 1 del, 1 sub ] 3 utterances, Seed-TTS-eval protocol "
                "(zh, mean of utterance rates), 2 missing (no transcript, left out) (test_set)")
    assert expected in done.stdout.splitlines()
    summary = json.loads((out / "wer.json").read_text())["summary"]
    assert summary["errors"] == 2 and summary["missing"] == ["d", "e"] and summary["missing_count"] == 2
    assert summary["missing_reasons"] == {"d": "no wav", "e": "no wav: no speech tokens generated"}
    assert summary["utterances"] == 3
    assert (summary["metric"], summary["label"], summary["language"]) == ("protocol", "CER", "zh")
    assert summary["error_rate"] == pytest.approx(0.7 / 3) and summary["corpus_error_rate"] == pytest.approx(2 / 10)
    assert (out / "wer.txt").read_text().rstrip().endswith(expected)
    assert ("# missing, no transcript, left out of the figures (2): d (no wav) e (no wav: no speech tokens "
            "generated)") in (out / "wer.txt").read_text()
    assert "missing wav:" in done.stdout
    assert (out / "hyp.txt").read_text(encoding="utf-8") == "a 你们好\nb 今天去公\nc 南京\n"
    per = json.loads((out / "per.json").read_text())["summary"]  # our pinyin rate: the same rule
    assert per["metric"] == "pinyin" and per["missing"] == ["d", "e"] and per["missing_count"] == 2
    assert per["ref_length"] == 10
    assert "by_language" not in summary and not (out / "languages.txt").exists()  # no language declared


def test_a_manifest_with_languages_is_scored_per_language(tmp_path, reward_server, capsys):
    """Each utterance with its declared language's protocol metric (else its script's): the
    stand-in ASR speaks Han characters only, so the en utterance is Han text declared en."""
    references = {"a": "今天去公园", "b": "北京 中国", "c": "Good morning.", "d": "中国"}
    spoken = {"a": "今天去公", "b": "北京中国", "d": "中国"}  # c: no wav
    out = tmp_path / "step_0"
    write_output_dir(out, references, spoken, languages={"a": "zh", "b": "en"})  # c, d: "" -> detected
    assert compute_wer.main(["--output-dir", str(out), "--server-url", reward_server.grpc_url, "--no-similarity",
                             "--set-name", "cv3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    # a: CER 1/5; b as en: words 北京 中国 against the one word 北京中国, WER 2/2 (its CER would be
    # 0); d: CER 0; c (detected en) has no wav. The set's figure covers all, as before: mean 0.4.
    assert printed[-3:-1] == ["en %WER 100.00 [ 2 / 2 ] 1 utterances, 1 missing",
                              "zh %CER 10.00 [ 1 / 7 ] 2 utterances"]
    assert printed[-1].startswith("%CER 40.00 [ 3 / 9, 0 ins, 2 del, 1 sub ] 3 utterances")
    payload = json.loads((out / "wer.json").read_text(encoding="utf-8"))
    by_language = payload["summary"]["by_language"]
    assert (by_language["en"]["label"], by_language["en"]["error_rate"], by_language["en"]["missing_count"]) == \
        ("WER", 1.0, 1)
    assert (by_language["zh"]["label"], by_language["zh"]["utterances"]) == ("CER", 2)
    assert by_language["zh"]["error_rate"] == pytest.approx(0.1)
    assert {u["utt_id"]: u["language"] for u in payload["utterances"]} == {"a": "zh", "b": "en", "d": "zh"}
    assert (out / "languages.txt").read_text(encoding="utf-8") == "a zh\nb en\nc en\nd zh\n"
    # the same transcripts in text mode with those languages: the same per-language figures
    assert compute_wer.main(["--ref", str(out / "ref.txt"), "--hyp", str(out / "hyp.txt"), "--metric", "protocol",
                             "--languages", str(out / "languages.txt")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-3:-1] == printed[-3:-1]


def test_utterances_declared_en_go_to_the_english_asr(tmp_path, reward_server, capsys):
    """--english-asr-model routes the en utterances (and only those) to that served model: the
    stand-in server serves asr_eval (zh) but not asr_eval_en, so the request for exactly the one en
    utterance fails, naming the model; with 'asr' as the English ASR both are scored."""
    out = tmp_path / "step_0"
    write_output_dir(out, {"a": "今天", "b": "北京"}, {"a": "今天", "b": "北京"}, languages={"a": "zh", "b": "en"})
    assert compute_wer.main(["--output-dir", str(out), "--server-url", reward_server.grpc_url, "--no-similarity",
                             "--english-asr-model", "asr_eval_en"]) == 1
    error = capsys.readouterr().err
    assert "transcribing 1 utterances with the server's 'asr_eval_en'" in error and "asr_eval_en" in error
    assert compute_wer.main(["--output-dir", str(out), "--server-url", reward_server.grpc_url, "--no-similarity",
                             "--english-asr-model", "asr"]) == 0
    payload = json.loads((out / "wer.json").read_text(encoding="utf-8"))
    assert sorted(u["utt_id"] for u in payload["utterances"]) == ["a", "b"]
    capsys.readouterr()


def test_an_unknown_declared_language_names_the_manifest(tmp_path, reward_server, capsys):
    out = tmp_path / "step_0"
    write_output_dir(out, {"a": "中国"}, {"a": "中国"}, languages={"a": "klingon"})
    assert compute_wer.main(["--output-dir", str(out), "--server-url", reward_server.grpc_url,
                             "--no-similarity"]) == 1
    error = capsys.readouterr().err
    assert str(out / "manifest.jsonl") in error and "utterance 'a'" in error and "'klingon'" in error


@pytest.mark.slow
def test_synthesize_writes_a_wav_and_prints_its_path(tmp_path, reward_server, tiny_policy):
    output = tmp_path / "demo.wav"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "synthesize.py"), "--model",
                           str(tiny_policy), "--output", str(output), "--server-url", reward_server.grpc_url,
                           "--max-new-tokens", "16", "--seed", "1"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(output)
    wave, rate = soundfile.read(output, dtype="float32")
    assert rate == standin.SAMPLE_RATE and len(wave) % standin.SAMPLES_PER_TOKEN == 0 and len(wave) > 0


def test_speaker_similarity_to_the_prompt_wav(tmp_path, reward_server, capsys):
    """Stand-in speaker embeddings: a prompt wav that IS the generated audio gives 1; another
    prompt gives the cosine of the documented stand-in embeddings; no prompt wav: skipped."""
    import numpy as np


    out = tmp_path / "step_0"
    spoken = {"a": "你们好", "b": "今天去公园", "c": "北京", "d": "中国", "e": "上下"}
    write_output_dir(out, spoken, spoken)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    same = standin.tokens_to_wave(standin.text_to_tokens(spoken["a"]))
    other = standin.tokens_to_wave(standin.text_to_tokens("一丁七万丈三"))
    soundfile.write(prompts / "same.wav", same, standin.SAMPLE_RATE, subtype="FLOAT")
    soundfile.write(prompts / "other.wav", other, standin.SAMPLE_RATE, subtype="FLOAT")
    (prompts / "broken.wav").write_bytes(b"not a wav file")
    prompt_of = {"a": str(prompts / "same.wav"), "b": str(prompts / "other.wav"), "c": "",
                 "d": str(prompts / "gone.wav"), "e": str(prompts / "broken.wav")}
    records = [{"id": utt_id, "text": text, "prompt_wav": prompt_of[utt_id], "error": None}
               for utt_id, text in spoken.items()]
    (out / "manifest.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                        encoding="utf-8")

    code = compute_wer.main(["--output-dir", str(out), "--server-url", reward_server.grpc_url, "--metric", "char"])
    assert code == 0
    generated_b = standin.tokens_to_wave(standin.text_to_tokens(spoken["b"]))
    e_b, e_other = standin.StandinSpeaker().embed([generated_b, other]).astype(np.float64)
    expected_b = float(e_b @ e_other / (np.linalg.norm(e_b) * np.linalg.norm(e_other)))
    assert expected_b < 0.999  # the two prompts really differ

    payload = json.loads((out / "wer.json").read_text(encoding="utf-8"))
    similarity = {u["utt_id"]: u["speaker_similarity"] for u in payload["utterances"]}
    assert similarity["a"] == pytest.approx(1.0, abs=1e-6)
    assert similarity["b"] == pytest.approx(expected_b, abs=1e-6)
    assert similarity["c"] is None and similarity["d"] is None and similarity["e"] is None
    summary = payload["summary"]
    assert summary["speaker_similarity_mean"] == pytest.approx((1.0 + expected_b) / 2, abs=1e-6)
    assert summary["speaker_similarity_utterances"] == 2 and summary["speaker_similarity_skipped"] == 3
    assert summary["errors"] == 0
    lines = (out / "wer.txt").read_text(encoding="utf-8").splitlines()
    assert lines[-2] == (f"%SIM {(1.0 + expected_b) / 2:.4f} mean speaker similarity to the prompt over "
                         "2 utterances, 3 skipped")
    assert lines[-1].startswith("%CER 0.00 [ 0 / ")
    assert "  sim: 1.0000" in lines and f"  sim: {expected_b:.4f}" in lines
    skipped_line = next(line for line in lines if line.startswith("# no speaker similarity (3): "))
    assert "c (no prompt wav) d (prompt wav " in skipped_line and f"e (cannot read {prompts / 'broken.wav'})" in skipped_line
    assert capsys.readouterr().out.splitlines()[-1].startswith("%CER")

    assert compute_wer.main(["--output-dir", str(out), "--server-url", reward_server.grpc_url, "--metric", "char",
                             "--no-similarity"]) == 0
    payload = json.loads((out / "wer.json").read_text(encoding="utf-8"))
    assert "speaker_similarity_mean" not in payload["summary"]
    assert all(u["speaker_similarity"] is None for u in payload["utterances"])
    assert not any(line.startswith("%SIM") for line in (out / "wer.txt").read_text(encoding="utf-8").splitlines())


def test_compute_wer_sh_refuses_a_bad_eval_similarity(tmp_path):
    env = dict(os.environ, eval_similarity="maybe")
    done = subprocess.run(["bash", str(REPO / "scripts" / "compute_wer.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "eval_similarity must be true or false, got 'maybe'" in done.stderr


@pytest.mark.slow
def test_protocol_sim_model_served_as_speaker(tmp_path):
    """The Seed-TTS-eval SIM model (tiny random WavLM + ECAPA-TDNN in the published checkpoint
    layout) served as 'speaker' over the stand-in engines: compute_wer's SIM equals the cosine
    of the model's own embeddings of the generated and prompt wavs."""
    import numpy as np

    from token2wav_server import engines_wavlm_sv as sv
    from token2wav_server.launch import start_server
    from ttsrl.triton_client import cosine_similarity

    checkpoint = tmp_path / "wavlm_large_finetune.pth"
    sv.save_checkpoint(sv.random_model(seed=5), str(checkpoint))
    out = tmp_path / "step_0"
    spoken = {"a": "你们好", "b": "今天去公园"}
    write_output_dir(out, spoken, spoken)
    prompt_waves = {"a": standin.tokens_to_wave([5, 6, 7, 8], voice=3), "b": standin.tokens_to_wave([9, 10], voice=9)}
    records = []
    for utt_id, wave in prompt_waves.items():
        soundfile.write(tmp_path / f"prompt_{utt_id}.wav", wave, standin.SAMPLE_RATE, subtype="FLOAT")
        records.append({"id": utt_id, "text": spoken[utt_id], "prompt_wav": str(tmp_path / f"prompt_{utt_id}.wav"),
                        "error": None})
    (out / "manifest.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                        encoding="utf-8")
    engines = ["--engine-option", "base_engines=token2wav_server.standin:create_engines",
               "--engine-option", f"sim_model={checkpoint}"]
    with start_server(engines="token2wav_server.engines_wavlm_sv:create_engines", extra_args=engines) as server:
        assert compute_wer.main(["--output-dir", str(out), "--server-url", server.grpc_url]) == 0
    model = sv.load_checkpoint(str(checkpoint))
    expected = {}
    for utt_id in spoken:
        generated, _ = soundfile.read(out / "wavs" / f"{utt_id}.wav", dtype="float32")
        expected[utt_id] = cosine_similarity(model.embed_one(generated), model.embed_one(prompt_waves[utt_id]))
    payload = json.loads((out / "wer.json").read_text(encoding="utf-8"))
    got = {u["utt_id"]: u["speaker_similarity"] for u in payload["utterances"]}
    assert got == pytest.approx(expected, abs=1e-4)
    assert payload["summary"]["speaker_similarity_mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-4)
    assert payload["summary"]["label"] == "CER" and payload["summary"]["error_rate"] == 0.0
