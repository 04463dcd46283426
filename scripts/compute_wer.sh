#!/usr/bin/env bash
# Score an infer_dist.py output folder (reference-compatible form):
#
#   bash scripts/compute_wer.sh OUT_DIR [SET_NAME]
#
# Transcribes OUT_DIR/wavs with the reward server's evaluation ASR ($eval_asr_model,
# default asr_eval; utterances declared en with $eval_english_asr_model when set: asr_eval_en,
# Whisper-large-v3) and writes:
#   OUT_DIR/ref.txt, OUT_DIR/hyp.txt   'utt_id text' lines
#   OUT_DIR/wer.txt, OUT_DIR/wer.json  the published metric (Seed-TTS-eval protocol): CER for a
#                                      zh/ja/ko set, WER for an en set ($eval_language: auto|zh|en|ja|ko)
#   OUT_DIR/per.txt, OUT_DIR/per.json  our pinyin error rate of the same transcripts
# A set that declares languages (CV3-Eval subsets, Seed-TTS-eval zh/ en/, a JSONL "language") is
# scored per language: wer.json/per.json "by_language", OUT_DIR/languages.txt (each utterance's).
# When the server serves the 'speaker' model, wer.txt/wer.json also hold the speaker
# similarity of each generated wav to its prompt wav and their mean (%SIM line);
# eval_similarity=false skips it.
# Server: the first URL of $REWARD_SERVER_URL (default grpc://127.0.0.1:8001).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OUT_DIR [SET_NAME]" >&2; exit 2; }
out_dir=$1
set_name=${2:-$(basename "$out_dir")}
python=${TRAINER_VENV:-$repo/.venv}/bin/python
url=${REWARD_SERVER_URL:-grpc://127.0.0.1:8001}
url=${url%%,*}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
similarity_flag=()
case ${eval_similarity:-true} in
  true) ;;
  false) similarity_flag=(--no-similarity) ;;
  *) echo "$0: eval_similarity must be true or false, got '$eval_similarity'" >&2; exit 2 ;;
esac

"$python" "$repo/scripts/compute_wer.py" --output-dir "$out_dir" --metric protocol \
  --language "${eval_language:-auto}" --set-name "$set_name" \
  --server-url "$url" --asr-model "${eval_asr_model:-asr_eval}" ${similarity_flag[@]+"${similarity_flag[@]}"} \
  ${eval_english_asr_model:+--english-asr-model "$eval_english_asr_model"}
# the pinyin rate per language too, with the languages the protocol scoring used (when the set declares any)
language_flag=()
[ -f "$out_dir/languages.txt" ] && language_flag=(--languages "$out_dir/languages.txt")
"$python" "$repo/scripts/compute_wer.py" --ref "$out_dir/ref.txt" --hyp "$out_dir/hyp.txt" --metric pinyin \
  --details "$out_dir/per.txt" --json "$out_dir/per.json" --set-name "$set_name" ${language_flag[@]+"${language_flag[@]}"}
