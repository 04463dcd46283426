"""infer_dist.py with torchrun (2 processes, gloo), a tiny converted policy and the real server (stand-in engines)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

import infer_dist
from tests.policy_utils import tiny_policy  # noqa: F401 (a fixture)
from token2wav_server import standin
from token2wav_server.launch import free_ports

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["你好世界", "今天天气很好", "我们去公园", "电话138", "吃葡萄", "明天见", "春天来了"]


PROMPT_TEXT = "提示文本"


def voice_of(utt_index: int) -> int:
    """The stand-in voice of utterance i's own prompt: all different, none the bank's (0)."""
    return utt_index % (standin.VOICES - 1) + 1


def write_prompt(path: Path, utt_index: int) -> np.ndarray:
    """A prompt wav of stand-in audio in utterance i's voice (16-bit PCM keeps it exact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = standin.tokens_to_wave([utt_index, 5, 6], voice=voice_of(utt_index))
    soundfile.write(path, wave, standin.SAMPLE_RATE, subtype="PCM_16")
    return soundfile.read(path, dtype="float32")[0]


def write_manifests(folder: Path) -> dict[str, Path]:
    """The same 7 utterances, each with its own prompt wav, as a Seed-TTS-eval meta.lst, a
    CV3-Eval task folder (as published: scp paths relative to the CV3-Eval checkout) and JSONL."""
    for i in range(len(TEXTS)):
        write_prompt(folder / "prompt-wavs" / f"p{i}.wav", i)
    meta = [f"utt{i}|{PROMPT_TEXT}|prompt-wavs/p{i}.wav|{text}" for i, text in enumerate(TEXTS)]
    (folder / "meta.lst").write_text("\n".join(meta) + "\n", encoding="utf-8")
    records = [{"id": f"utt{i}", "text": text, "prompt_text": PROMPT_TEXT, "prompt_wav": f"prompt-wavs/p{i}.wav"}
               for i, text in enumerate(TEXTS)]
    records[1].update(prompt_tokens=[1, 2, 3])
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                       encoding="utf-8")
    cv3 = folder / "CV3-Eval" / "data" / "zero_shot" / "zh"
    for i in range(len(TEXTS)):
        write_prompt(cv3 / "waveform" / f"prompt_audio_{i}.wav", i)
    (cv3 / "text").write_text("".join(f"utt{i} {t}\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    (cv3 / "prompt_text").write_text("".join(f"utt{i} {PROMPT_TEXT}\n" for i in range(len(TEXTS))), encoding="utf-8")
    (cv3 / "prompt_wav.scp").write_text(
        "".join(f"utt{i} data/zero_shot//zh/waveform/prompt_audio_{i}.wav\n" for i in range(len(TEXTS))),
        encoding="utf-8")
    return {"meta.lst": folder / "meta.lst", "jsonl": folder / "test.jsonl", "cv3-eval": cv3}


def torchrun_command(policy: Path, manifest: Path, out: Path, server_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_ports(1)[0]}",
            str(REPO / "infer_dist.py"), "--model", str(policy), "--manifest", str(manifest), "--output-dir", str(out),
            "--server-url", server_url, "--max-new-tokens", "12", "--batch-size", "2", "--seed", "3", *extra]


def run_env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (torch elastic starts each worker in a session of its own)."""
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    for child in children:
        child.kill()
    os.killpg(process.pid, signal.SIGKILL)
    psutil.wait_procs(children, timeout=10)
    process.wait()


def run_torchrun(command: list[str]) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group, so a timeout kills the workers too."""
    process = subprocess.Popen(command, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"torchrun timed out:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def rank_log_lines(out: Path) -> dict[str, list[str]]:
    return {log.name: log.read_text(encoding="utf-8").splitlines() for log in sorted((out / "logs").glob("rank_*.log"))}


def rank_log_ids(out: Path, since: dict[str, list[str]] | None = None) -> list[str]:
    """Utterance ids the ranks logged, all of them or only those after the snapshot ``since``."""
    ids = []
    for name, lines in rank_log_lines(out).items():
        skip = len((since or {}).get(name, []))
        ids += [line.split("\t")[0] for line in lines[skip:]]
    return ids


def check_outputs(out: Path, own_voice: bool = True):
    """Every record is whole; each wav is the stand-in decoder's audio, spoken in the voice of
    the utterance's own prompt (own_voice) or the bank's voice 0, as its record says."""
    from ttsrl.triton_client import speaker_prompt_key

    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in manifest] == [f"utt{i}" for i in range(len(TEXTS))]
    for index, record in enumerate(manifest):
        if record["error"] is not None:
            assert record["error"] == "no speech tokens generated" and record["tokens"] == 0
            continue
        wave, rate = soundfile.read(out / "wavs" / f"{record['id']}.wav", dtype="float32")
        assert rate == standin.SAMPLE_RATE
        assert len(wave) == record["tokens"] * standin.SAMPLES_PER_TOKEN
        assert record["duration"] == pytest.approx(len(wave) / rate)
        assert standin.wave_to_tokens(wave) is not None  # exactly the stand-in decoder's audio
        if own_voice:
            prompt_wave, prompt_rate = soundfile.read(record["prompt_wav"], dtype="float32")
            assert standin.wave_voice(wave) == voice_of(index) == standin.wave_voice(prompt_wave)
            assert record["prompt_voice"] == "utterance"
            assert record["prompt_id"] == speaker_prompt_key(prompt_wave, prompt_rate, PROMPT_TEXT)
        else:
            assert standin.wave_voice(wave) == 0
            assert record["prompt_voice"] == "bank" and record["prompt_id"].startswith("bank:")
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["meta.lst", "jsonl", "cv3-eval"])
def test_two_ranks_each_utterance_once_then_resume_does_nothing(tmp_path, tiny_policy, reward_server, kind):
    manifest = write_manifests(tmp_path / "set")[kind]
    out = tmp_path / "out"
    first = run_torchrun(torchrun_command(tiny_policy, manifest, out, reward_server.grpc_url))
    assert first.returncode == 0, first.stderr[-3000:]
    records = check_outputs(out)
    assert sum(r["error"] is None for r in records) >= 5
    ids = rank_log_ids(out)
    snapshot = rank_log_lines(out)
    assert sorted(ids) == sorted(f"utt{i}" for i in range(len(TEXTS)))  # every utterance exactly once
    assert {p.name for p in (out / "logs").iterdir()} == {"rank_0.log", "rank_1.log"}
    if kind == "jsonl":
        assert records[1]["prompt_tokens_source"] == "manifest"
    assert all(r["zero_shot"] for r in records)  # prompt tokens from the manifest or the server's tokenizer
    ok = [r["id"] for r in records if r["error"] is None]
    second = run_torchrun(torchrun_command(tiny_policy, manifest, out, reward_server.grpc_url))
    assert second.returncode == 0, second.stderr[-3000:]
    retried = rank_log_ids(out, since=snapshot)
    assert sorted(retried) == sorted(set(f"utt{i}" for i in range(len(TEXTS))) - set(ok))  # only failures redone
    assert f"{len(retried)} attempted this run" in second.stdout


@pytest.mark.slow
def test_killed_run_is_completed_by_the_next(tmp_path, tiny_policy, reward_server):
    manifest = write_manifests(tmp_path / "set")["jsonl"]
    out = tmp_path / "out"
    command = torchrun_command(tiny_policy, manifest, out, reward_server.grpc_url, "--batch-size", "1")
    process = subprocess.Popen(command, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    kill_tree(process)
    logged_before = rank_log_lines(out)
    finished_before = {f"utt{i}" for i in range(len(TEXTS)) if infer_dist.is_done(out, f"utt{i}")}
    assert 0 < len(list((out / "records").glob("*.json"))) < len(TEXTS)
    assert not (out / "manifest.jsonl").exists()
    rerun = run_torchrun(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_outputs(out)
    redone = rank_log_ids(out, since=logged_before)
    # the rerun did exactly what the killed run had not finished, each once
    assert sorted(redone) == sorted({f"utt{i}" for i in range(len(TEXTS))} - finished_before)
    assert not [p.name for p in out.rglob(".*.tmp-*")]


def test_manifest_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "meta.lst"
    bad.write_text("a|p|w.wav|你好\nb|only|three\n", encoding="utf-8")
    with pytest.raises(infer_dist.ManifestError, match=r"meta\.lst:2: expected 'utt\|prompt_text\|prompt_wav\|text'.* 3 fields"):
        infer_dist.read_manifest(str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "好"}\n{"id": "a", "text": "行"}\n', encoding="utf-8")
    with pytest.raises(infer_dist.ManifestError, match=r"dup\.jsonl:2: duplicate utterance id 'a'"):
        infer_dist.read_manifest(str(dup))
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"id": "a", "text": "  "}\n', encoding="utf-8")
    with pytest.raises(infer_dist.ManifestError, match="has no text"):
        infer_dist.read_manifest(str(empty))


def test_relative_prompt_paths_resolve_as_each_layout_publishes_them(tmp_path):
    manifests = write_manifests(tmp_path / "set")
    utterances = infer_dist.read_manifest(str(manifests["meta.lst"]))
    assert utterances[0].prompt_wav == str((tmp_path / "set" / "prompt-wavs" / "p0.wav").resolve())
    assert utterances[0].where == f"{manifests['meta.lst']}:1"
    assert infer_dist.read_manifest(str(manifests["jsonl"]))[1].prompt_tokens == [1, 2, 3]
    cv3 = infer_dist.read_manifest(str(manifests["cv3-eval"]))
    assert [(u.id, u.text, u.prompt_text) for u in cv3[:2]] == [("utt0", TEXTS[0], PROMPT_TEXT),
                                                                 ("utt1", TEXTS[1], PROMPT_TEXT)]
    assert cv3[2].prompt_wav == str((manifests["cv3-eval"] / "waveform" / "prompt_audio_2.wav").resolve())
    assert cv3[0].where == f"{manifests['cv3-eval'].resolve() / 'text'}:1"
    # a five-field Seed-TTS-eval line (with the ground-truth wav) reads the same
    five = tmp_path / "five.lst"
    five.write_text("u|提示|p.wav|你好|gt/u.wav\n", encoding="utf-8")
    assert infer_dist.read_manifest(str(five))[0].text == "你好"


def test_zero_shot_messages_put_prompt_speech_in_the_answer():
    utt = infer_dist.Utterance("a", "你好", prompt_text="提示", prompt_tokens=[5, 6])
    assert infer_dist.build_messages(utt) == [{"role": "user", "content": "提示你好"},
                                              {"role": "assistant", "content": "<|s_5|><|s_6|>"}]
    assert infer_dist.build_messages(infer_dist.Utterance("b", "你好"))[1]["content"] == ""


def test_prompt_tokens_come_from_the_server_speech_tokenizer(tmp_path, tiny_policy, reward_server):
    """A prompt wav of stand-in audio is tokenized by the live server into exactly its ids; the
    utterance is then prompted zero-shot with them. Audio the tokenizer cannot read, and a server
    without the model, leave text-only prompting; manifest tokens win over the wav."""
    from transformers import AutoTokenizer

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

    unserved = infer_dist.read_manifest(str(manifest))
    sources = infer_dist.fill_prompt_tokens(unserved, reward_server.grpc_url, model="no_such_model")
    assert sources == {"u0": "none", "u1": "none", "u2": "manifest", "u3": "none"}
    assert unserved[0].prompt_tokens == []

    utterances = infer_dist.read_manifest(str(manifest))
    sources = infer_dist.fill_prompt_tokens(utterances, reward_server.grpc_url)
    assert sources == {"u0": "server", "u1": "none", "u2": "manifest", "u3": "none"}
    assert [u.prompt_tokens for u in utterances] == [ids, [], [7, 8], []]
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    prompt = infer_dist.chat_prompts(tokenizer, utterances[:1])[0]
    assert prompt.endswith("提示你好<|task_id|>" + format_speech_tokens(ids))

    out = tmp_path / "out"
    args = infer_dist.build_parser().parse_args(["--model", str(tiny_policy), "--manifest", str(manifest),
                                                 "--output-dir", str(out), "--server-url", reward_server.grpc_url,
                                                 "--max-new-tokens", "4", "--greedy", "--prompt-voice", "bank"])
    infer_dist.run(args)
    written = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines())}
    assert [(written[u]["zero_shot"], written[u]["prompt_tokens_source"]) for u in ("u0", "u1", "u2", "u3")] == [
        (True, "server"), (False, "none"), (True, "manifest"), (False, "none")]


@pytest.mark.slow
def test_in_process_engines_in_the_server_environment(tmp_path, tiny_policy):
    """No server: the server environment runs infer_dist with the stand-in engines in-process."""
    manifest = write_manifests(tmp_path / "set")["jsonl"]
    out = tmp_path / "out"
    server_python = REPO / ".venv-server" / "bin" / "python"  # each utterance in its own prompt's voice
    done = subprocess.run([str(server_python), str(REPO / "infer_dist.py"), "--model", str(tiny_policy), "--manifest",
                           str(manifest), "--output-dir", str(out), "--engines", "token2wav_server.standin:create_engines",
                           "--max-new-tokens", "12", "--batch-size", "4", "--max-utterances", "3"],
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["utt0", "utt1", "utt2"]
    assert records[1]["prompt_tokens_source"] == "manifest" and records[0]["prompt_tokens_source"] == "none"
    check_outputs_of = [r for r in records if r["error"] is None]
    assert check_outputs_of
    for record in check_outputs_of:
        wave, rate = soundfile.read(out / "wavs" / f"{record['id']}.wav", dtype="float32")
        assert rate == standin.SAMPLE_RATE and len(wave) == record["tokens"] * standin.SAMPLES_PER_TOKEN
        assert standin.wave_voice(wave) == voice_of(int(record["id"][3:]))
        assert record["prompt_voice"] == "utterance" and len(record["prompt_id"]) == 64


def run_in_process(policy: Path, manifest: Path, out: Path, server_url: str, *extra: str) -> dict:
    args = infer_dist.build_parser().parse_args(["--model", str(policy), "--manifest", str(manifest), "--output-dir",
                                                 str(out), "--server-url", server_url, "--max-new-tokens", "6",
                                                 "--batch-size", "4", "--seed", "1", *extra])
    return infer_dist.run(args)


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
    with pytest.raises(infer_dist.BadPromptError) as failed:
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
