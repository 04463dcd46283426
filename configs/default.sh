# Settings for run.sh (GPU recipe). run.sh sources this file (or --config FILE);
# any variable already set in the environment (even to an empty value) wins, so
#   CUDA_VISIBLE_DEVICES=0,1 exp_name=try2 bash run.sh 2 2
# works without editing. Paths are relative to the repository root.

# --- model family -------------------------------------------------------------
# cosyvoice2 (iic/CosyVoice2-0.5B) or cosyvoice3 (FunAudioLLM/Fun-CosyVoice3-0.5B-2512): which
# LLM stage -1 downloads and converts, its speech-token vocabulary and stop tokens, its prompt
# layout and its token2wav engines (ttsrl/model_family.py says what each family is). A model
# directory of the other family stops the stage, naming both.
: "${model_family=cosyvoice2}"
# grpo (veRL, online) or dpo (TRL, offline; section "DPO instead of GRPO" below). With the family it
# names the default experiment folder: runs of another family or algorithm never share one.
: "${train_algorithm=grpo}"

# --- where things live -------------------------------------------------------
: "${pretrained_dir=pretrained_models}"             # downloaded models
: "${cosyvoice2_dir=$pretrained_dir/CosyVoice2-0.5B}" # iic/CosyVoice2-0.5B (ModelScope)
: "${cosyvoice3_dir=$pretrained_dir/Fun-CosyVoice3-0.5B-2512}"  # FunAudioLLM/Fun-CosyVoice3-0.5B-2512
: "${sensevoice_dir=$pretrained_dir/SenseVoiceSmall}"  # iic/SenseVoiceSmall (ModelScope)
: "${paraformer_dir=$pretrained_dir/paraformer-zh}"    # evaluation ASR (stage 4)
: "${emotion2vec_dir=$pretrained_dir/emotion2vec_plus_large}"  # iic/emotion2vec_plus_large (ModelScope): the emotion
                                         # reward component; stage -1 downloads it when reward_preset weights emotion
: "${eval_asr_en_model=$pretrained_dir/whisper/large-v3.pt}"  # English evaluation ASR (asr_eval_en: Whisper-large-v3,
                                         # stage -1 on GPU machines; English utterances in stage 4; empty: none)
: "${model_source=modelscope}"                        # modelscope: download the models (stage -1); tiny:
                                                      # build tiny random ones (configs/smoke.sh, --rehearse)
: "${cosyvoice_src=CosyVoice}"                         # CosyVoice source checkout
: "${cosyvoice_commit=ace7c47f41bbd303aa6bf1ea80e6f9fbd595cd40}"
: "${hf_model_dir=$pretrained_dir/${model_family}_llm_hf}"  # the family's LLM in Hugging Face form

# --- data (stage 0) ----------------------------------------------------------
: "${train_file=data/raw/train.jsonl}"   # JSON/JSONL with a "text" field per record
# test_file: data/raw/test.jsonl when that file exists (the reference recipe's layout, README
# "Reproduce the published result"), else empty: stage 0 splits test_size rows off train_file.
if [ -z "${test_file+set}" ]; then
  if [ -f data/raw/test.jsonl ]; then test_file=data/raw/test.jsonl; else test_file=; fi
fi
: "${test_size=100}"
: "${data_dir=data/$model_family}"        # train.parquet / test.parquet / dev.jsonl land here: one folder
                                         # per family (its prompt speech tokens and prompt layout); a folder
                                         # of another family stops stage 0, naming both
: "${max_chars=80}"                      # longest text; 80 characters at 4/s is 20 s = 500 speech tokens
: "${speech_chars_per_second=4.0}"       # speaking rate the preflight assumes: max_chars must fit
                                         # data.max_response_length at 25 speech tokens/s
: "${data_seed=0}"                       # test/dev split and prompt pairing
# Upstream CosyVoice's length bounds: every rollout, evaluation and synthesis call generates at least
# min and at most max times its text's tokens of speech tokens (Qwen2LM.inference: 2 and 20)
: "${min_token_text_ratio=2}"
: "${max_token_text_ratio=20}"
# Zero-shot training (the policy sees each text with a speaker prompt, as CosyVoice2 is used):
# train_prompts pairs every text with a prompt of this set (a folder of wavs with .txt/.lab
# transcripts, a JSONL of prompt_wav + prompt_text, or a Seed-TTS-eval meta.lst), balanced across
# speakers. Records with their own prompt_wav/prompt_text keep theirs. Empty, with no per-record
# prompt: the reference recipe's text-only training. Use reward_preset=zero_shot with it.
: "${train_prompts=}"
: "${on_bad_prompt=fail}"                # a missing/unreadable/<1 s/>30 s/<16 kHz/untranscribed prompt: fail|skip
: "${allow_held_out_prompts=false}"      # false: stage 0 refuses training prompts (train_prompts, records' own) that
                                         # are prompts of eval_manifest or dev_manifest (same recording by content,
                                         # or same transcript), naming both; true: a warning (a task that evaluates
                                         # in its training voices on purpose, as configs/smoke.sh's)
: "${dev_size=100}"                      # rows held out of train as $data_dir/dev.jsonl: stage 4 picks the
                                         # best step on it, never on the test set (eval_select_on)

# --- experiment --------------------------------------------------------------
: "${exp_name=${model_family}_${train_algorithm}}"  # exp/cosyvoice2_grpo, exp/cosyvoice3_dpo, ...
: "${exp_dir=exp/$exp_name}"             # checkpoints, logs, merged models, eval: one run's (run.json there
                                         # records its family and algorithm; another run's stops the stage)

# --- hardware ----------------------------------------------------------------
# What stage 2 trains on: cuda (stops, naming the failed check, unless nvidia-smi lists
# n_gpus_per_node visible GPUs), cpu (tiny models only: configs/smoke.sh), or auto (cuda when
# that check passes, else the CPU, with a warning saying why).
: "${train_device=cuda}"
: "${CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7}"
: "${cuda_wheels=cu130}"                 # CUDA builds stage -1 installs: cu130 (PyPI; NVIDIA driver >= 580) or
                                         # cu128 (PyTorch's and vLLM's CUDA 12.8 builds; driver >= 525)
: "${cuda_compat_dir=}"                  # older driver on data-center GPUs: NVIDIA's forward-compatibility
                                         # libraries (cuda-compat-13-0: /usr/local/cuda-13.0/compat), put first
                                         # on LD_LIBRARY_PATH of every stage and Ray worker (README "Hardware")
: "${n_gpus_per_node=8}"
: "${nnodes=1}"

# --- reward server (stage 1) -------------------------------------------------
: "${server_host=127.0.0.1}"
: "${http_port=8000}"
: "${grpc_port=8001}"
: "${metrics_port=8002}"
# GPUs of the reward server, comma separated (or cpu): by default every training GPU of the node, one
# instance each, as the reference recipe serves (vLLM leaves room: gpu_memory_utilization 0.6); the
# reward hook weighs each server by its slots (devices x instances). Dedicated reward nodes:
# scripts/slurm_grpo.sbatch reward_nodes=N.
: "${server_devices=$(seq -s, 0 $((n_gpus_per_node - 1)))}"
: "${server_instances_per_device=1}"
: "${server_models=training}"            # training: token2wav, the reward ASR, the speech tokenizer and the
                                         # weighted components' engines only; all: also the evaluation models
                                         # (then stage 4 uses this server instead of starting its own)
: "${server_fp16=auto}"                  # flow (CosyVoice3: and HiFT) under fp16 autocast: auto (on with CUDA),
                                         # true, false (docs/reward_server.md "Decoding settings")
: "${server_flow_batch=auto}"            # a dynamic batch through the flow in one pass: auto (on with CUDA
                                         # unless server_load_trt), true, false
: "${server_load_jit=false}"             # CosyVoice2's JIT flow encoder (flow.encoder.fp16/fp32.zip; CUDA)
: "${server_load_trt=false}"             # TensorRT flow estimator, both families, built on first start from the
                                         # model dir's flow.decoder.estimator.fp32.onnx (CUDA; upstream's
                                         # cosyvoice/bin/export_onnx.py writes it)
: "${server_log=$exp_dir/logs/reward_server.log}"  # empty with server_foreground=true: stdout only (SLURM)
: "${server_engines=token2wav_server.engines_$model_family:create_engines}"  # the family's real engines
: "${reward_config=configs/reward.yaml}"
: "${reward_preset=intelligibility}"     # a preset of reward_config: intelligibility (error rate; the
                                         # reference's reward) or zero_shot (error rate + speaker similarity)
: "${REWARD_SERVER_URL=grpc://$server_host:$grpc_port}"  # comma-separated list of servers: the hook
                                         # routes by outstanding work per server slot (REWARD_ROUTING)
: "${prompt_bank=$cosyvoice_src/asset/zero_shot_prompt.wav}"  # speaker prompts: wav, JSONL or folder
: "${server_args=}"                       # extra python -m token2wav_server flags (--max-batch-size 64 ...)
: "${server_foreground=false}"            # true: stage 1 serves in the foreground (SLURM, a dedicated terminal)
: "${server_start_timeout=900}"           # seconds to wait for the models to load
: "${stop_server_at_exit=false}"          # true: stop a server this run started when run.sh exits
: "${server_supervise=true}"              # restart Triton when it dies; false under systemd/SLURM restarts
: "${server_max_restarts=10}"             # supervised restarts allowed within 10 minutes before giving up

# --- GRPO (stage 2) ----------------------------------------------------------
# The sizes below are the reference recipe's (CosyVoice examples/grpo/cosyvoice2/run.sh at the
# pinned commit: 8 GPUs, 32 prompts x 4 rollouts, ppo_mini_batch_size 32 = one optimizer update
# per step, micro batch 4, lr 1e-6, 1 epoch, save/test every 100 steps); configs/grpo.yaml lists
# where the recipe differs from it, and why. tests/test_train_grpo.py checks both.
: "${sft_data=}"                         # supervised warm-up before GRPO: stage 0's train.parquet (the
                                         # prompts GRPO sees) or a JSONL of {text, speech_tokens}
: "${sft_steps=200}"                     # warm-up optimizer steps (batch 16)
: "${sft_lr=1e-5}"                       # CosyVoice's own fine-tuning lr for the 0.5B LLM
: "${sft_args=}"                         # extra scripts/sft_warmup.py flags (--batch-size, --seed, --standin-targets)
: "${algorithm_preset=grpo}"             # grpo|dapo|dr_grpo|gspo|gdpo: veRL options (configs/algorithm_presets.yaml)
: "${grpo_overrides=}"                   # veRL key=value overrides of this config (before the command line's)
: "${attn_implementation=auto}"          # the actor's attention: auto (flash_attention_2 when flash-attn imports
                                         # in the CUDA trainer environment, else sdpa, torch's own, on GPUs and
                                         # CPU alike), sdpa, eager or flash_attention_2
: "${train_batch_size=32}"               # prompts per step (x rollout_n responses)
: "${rollout_n=4}"
: "${ppo_mini_batch_size=32}"            # prompts per optimizer update: 32 of 32 = one update per step
: "${micro_batch_size_per_gpu=4}"
: "${total_epochs=1}"
: "${save_freq=100}"
: "${test_freq=100}"
# Refused rollouts (the reward server refuses an item, e.g. a prompt under 16 kHz): no gradient,
# counted (reward/failed/mean) and logged in $exp_dir/reward_failures.jsonl; the run stops, naming
# the items, before a step whose refused share is over the budget or on the Nth step in a row with
# any (docs/training.md "Refused rollouts"). Checkpoint retention: configs/grpo.yaml
# (trainer.max_actor_ckpt_to_keep, tts.keep_best_checkpoint).
: "${reward_failure_budget=0.01}"        # share of a step's rollouts that may be refused (0 <= x < 1)
: "${reward_failure_max_consecutive_steps=3}"  # steps in a row with refusals that stop the run (0: off)

# --- DPO instead of GRPO (stage 2 with train_algorithm=dpo, set above) --------
# Offline preference optimization from the same reward server: each round samples
# dpo_samples_per_prompt responses for dpo_prompts training prompts, scores them (every reward
# component), keeps one chosen/rejected pair per prompt by the pair rule (docs/training.md "DPO")
# and trains with TRL's DPOTrainer; round R+1 starts from round R's policy. Checkpoints are
# $exp_dir/global_step_N/hf_model (N: optimizer steps over all rounds); stages 3-6 take them as
# they take GRPO's (the merge is a copy). The sft_data warm-up runs first here too.
: "${dpo_rounds=1}"                      # iterated DPO: rounds of sample -> score -> pair -> train
: "${dpo_prompts=0}"                     # training prompts sampled per round (0: every row of train.parquet)
: "${dpo_samples_per_prompt=8}"          # N responses per prompt (at least 2)
: "${dpo_max_new_tokens=512}"            # sampling limit in speech tokens (configs/grpo.yaml's max_response_length); the reward's
                                         # truncation guard uses it as GRPO's uses max_response_length
: "${dpo_max_chosen_error=0.05}"         # the chosen response's error rate (CER/WER) must be at most this
: "${dpo_min_margin=1e-6}"               # pairs whose reward margin is smaller are ties, dropped
: "${dpo_val_fraction=0.05}"             # share of the pairs held out (TRL evaluates on them each epoch)
: "${dpo_beta=0.1}"                      # DPO temperature: larger keeps the policy nearer the reference
: "${dpo_loss=sigmoid}"                  # sigmoid (DPO) | ipo
: "${dpo_sft_weight=1.0}"                # RPO-style NLL term on the chosen response (0: plain DPO/IPO)
: "${dpo_lr=1e-6}"
: "${dpo_epochs=1}"
: "${dpo_batch_size=8}"                  # pairs per device per optimizer step (x dpo_grad_accum x GPUs)
: "${dpo_grad_accum=1}"
: "${dpo_sample_args=}"                  # extra train_dpo.py sample flags (--temperature, --top-p, --prompts-per-batch)

# bash run.sh --force 2 2: GRPO does not resume. The previous run's checkpoints and the
# results made from them (global_step_*, latest_checkpointed_iteration.txt, eval/, synth/,
# validation_generations/, validation_audio/, tensorboard/) move to $exp_dir/replaced_<time>/
# first (logged; nothing is deleted), so resume_mode=auto finds nothing and starts at step 0.

# --- merge (stage 3) ---------------------------------------------------------
: "${merge_steps=all}"                   # all, latest, or a list such as 100,200

# --- evaluation (stages 4-6) -------------------------------------------------
: "${eval_manifest=data/seedtts_testset/zh/meta.lst}"  # Seed-TTS-eval meta.lst (zh/en), a CV3-Eval task
                                         # folder (CV3-Eval/data/zero_shot/zh) or JSONL; see README "Stage 4"
: "${eval_set_name=zh}"
: "${dev_manifest=}"                     # the set that chooses best_step (same layouts as eval_manifest);
                                         # empty: $data_dir/dev.jsonl, stage 0's dev slice (dev_size)
: "${eval_select_on=dev}"                # dev: the best step is chosen on the dev set (none: stage 4 stops,
                                         # naming the fixes); test: on the test set, only when you ask for it
: "${eval_prompt_voice=utterance}"       # utterance: each utterance in its own prompt's voice; bank: the server's
: "${eval_on_bad_prompt=fail}"           # a row with a missing/unreadable/too long/untranscribed prompt: fail|skip
: "${eval_language=auto}"                # protocol metric: zh, ja, ko (CER), en (WER), auto (from the texts);
                                         # a set that declares languages is scored per language (README "Stage 4")
: "${eval_select_by=$([ "$reward_preset" = zero_shot ] && echo cer_sim || echo cer)}"  # best_step.txt by:
                                         # cer|wer (published error rate), pinyin, sim, or cer_sim (zero_shot's
                                         # default: lowest error rate among steps whose SIM is within 0.02 of the best)
: "${eval_allow_missing=false}"          # true: a step missing more utterances than step 0 may be chosen
: "${eval_sim_model=$pretrained_dir/wavlm_large_finetune.pth}"  # Seed-TTS-eval SIM model (stage -1 on GPU);
                                         # when the file exists, stage 1 serves it as 'speaker'; empty: campplus
: "${eval_sim_model_gdrive_id=1-aE1NfzpRCLxA4GUxX9ITI3F9LlbtEGP}"  # its file on Google Drive (seed-tts-eval README)
: "${eval_nproc=$n_gpus_per_node}"       # infer_dist.py processes (one per GPU)
: "${eval_master_port=29511}"
: "${eval_asr_model=asr_eval}"           # served ASR that transcribes for CER (asr_eval: Paraformer-zh)
# Stage 4's evaluation models (Paraformer, Whisper, the SIM model) are not in the training server
# (server_models=training): stage 4 starts an evaluation server of its own (--models all) on these
# ports and devices and stops it when it ends, unless eval_server_url names one that serves them,
# or the stage 1 server does (server_models=all).
: "${eval_server_url=}"                   # a running server with the evaluation models (grpc://HOST:PORT)
: "${eval_server_devices=$server_devices}"
: "${eval_http_port=8010}"
: "${eval_grpc_port=8011}"
: "${eval_metrics_port=8012}"
: "${eval_similarity=true}"              # speaker similarity to prompt wavs when the server serves 'speaker'
: "${infer_args=--batch-size 16}"        # extra infer_dist.py flags (sampling, max new tokens, ...)
: "${synth_text=八百标兵奔北坡，炮兵并排北边跑。炮兵怕把标兵碰，标兵怕碰炮兵炮。}"
: "${synth_step=}"                       # stage 5 checkpoint step; empty: best of stage 4, else latest
: "${synth_args=}"                       # extra synthesize.py flags (--prompt-text, --prompt-tokens, --seed)
: "${export_step=}"                      # stage 6 checkpoint step; empty: best of stage 4, else latest

# --- rehearsal (bash run.sh --rehearse START STOP) ---------------------------
# The stages of this config on a CPU machine, changing only what a CPU forces (scripts/rehearsal.sh
# prints the list); every output and download goes under rehearsal_root, apart from a real run's.
: "${rehearsal_root=exp/rehearsal}"
