#!/usr/bin/env bash
# Score an infer_dist.py output folder (reference-compatible form):
#
#   bash scripts/compute_wer.sh OUT_DIR [SET_NAME]
#
# Transcribes OUT_DIR/wavs with the reward server's evaluation ASR ($eval_asr_model,
# default asr_eval) and writes:
#   OUT_DIR/ref.txt, OUT_DIR/hyp.txt   'utt_id text' lines
#   OUT_DIR/wer.txt, OUT_DIR/wer.json  the published metric (Seed-TTS-eval protocol): CER for a
#                                      zh set, WER for an en set ($eval_language: auto|zh|en)
#   OUT_DIR/per.txt, OUT_DIR/per.json  our pinyin error rate of the same transcripts
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
  --server-url "$url" --asr-model "${eval_asr_model:-asr_eval}" ${similarity_flag[@]+"${similarity_flag[@]}"}
"$python" "$repo/scripts/compute_wer.py" --ref "$out_dir/ref.txt" --hyp "$out_dir/hyp.txt" --metric pinyin \
  --details "$out_dir/per.txt" --json "$out_dir/per.json" --set-name "$set_name"
